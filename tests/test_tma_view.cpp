// The copy engine's views (src/cuda/common/tma_view.h) on the CPU: the index map of a chunk's
// (C, R, X) row tile as a 2-D (C·R) x X box, the legality rules, and the 128-byte swizzle.
#include "cuda/common/tma_view.h"

#include <gtest/gtest.h>

#include <set>
#include <string>

namespace mamba3::cuda {
namespace {

// A (B, L, R, G, X) tensor laid out with padded rows: every (token, rank, group) row holds
// X + pad elements.
RowTensor rows(int64_t B, int64_t L, int64_t R, int64_t G, int64_t X, int64_t pad) {
  RowTensor t;
  t.batch = B, t.tokens = L, t.ranks = R, t.heads = G, t.cols = X;
  t.s_col = 1, t.s_head = X + pad, t.s_rank = G * t.s_head, t.s_token = R * t.s_rank;
  t.s_batch = L * t.s_token;
  t.elem_bytes = 2;
  return t;
}

// Every element of every chunk's box, through row_tile_coords and the view's strides, is the
// element (token c0 + i / R, rank i % R, column col0 + x) of (b, g) in the tensor's own
// indexing; rows past the last token are outside the view (the copy engine writes zeros).
TEST(TmaView, RowTileIndexMapMatchesTheTensor) {
  struct Case {
    int64_t B, L, R, G, X, pad;
    int box_cols;
  };
  for (const Case& c : {Case{2, 100, 1, 2, 128, 0, 64}, Case{1, 37, 4, 1, 128, 0, 64},
                        Case{2, 19, 8, 2, 64, 8, 64}, Case{3, 70, 2, 4, 128, 24, 64},
                        Case{1, 5, 1, 1, 64, 0, 32}}) {
    const RowTensor t = rows(c.B, c.L, c.R, c.G, c.X, c.pad);
    const RowTileView rv = row_tile_view(t, 0x1000, 64, c.box_cols, c.box_cols * 2 <= 128 ? 128 : 0);
    ASSERT_EQ(rv.error, "");
    const TmaView& v = rv.view;
    const int C = 64 / static_cast<int>(c.R);
    int checked = 0;
    for (int b = 0; b < c.B; ++b)
      for (int g = 0; g < c.G; ++g)
        for (int64_t c0 = 0; c0 < c.L; c0 += C)
          for (int col0 = 0; col0 < c.X; col0 += c.box_cols) {
            int32_t co[4];
            row_tile_coords(b, g, c0, static_cast<int>(c.R), col0, co);
            for (uint32_t i = 0; i < v.box[1]; ++i)
              for (uint32_t x = 0; x < v.box[0]; ++x) {
                const int64_t at[4] = {co[0] + int64_t{x}, co[1] + int64_t{i}, co[2], co[3]};
                const int64_t tok = c0 + i / c.R, r = i % c.R;
                const bool inside = static_cast<uint64_t>(at[1]) < v.dim[1];
                ASSERT_EQ(inside, tok < c.L);
                if (!inside) continue;
                const uint64_t want =
                    2 * static_cast<uint64_t>(b * t.s_batch + tok * t.s_token + r * t.s_rank +
                                              g * t.s_head + col0 + x);
                ASSERT_EQ(tma_view_offset(v, at), want)
                    << "b " << b << " g " << g << " c0 " << c0 << " row " << i << " col " << x;
                ++checked;
              }
          }
    EXPECT_EQ(checked, c.B * c.G * c.L * c.R * c.X);  // every element exactly once
  }
}

// The rank-5 view of the forward's q and k boxes: (N + 8) columns x R ranks x C tokens, the 8
// columns past N outside the view (zeros: the padded pitch), any token / rank strides, and q
// shared by the ranks (rank stride 0).
TEST(TmaView, RankTileIndexMapMatchesTheTensor) {
  struct Case {
    int64_t B, L, R, G, X, pad;
    bool shared_ranks;
  };
  for (const Case& c : {Case{2, 100, 1, 2, 128, 0, false}, Case{1, 37, 4, 1, 64, 0, false},
                        Case{2, 19, 8, 2, 128, 8, false}, Case{1, 21, 4, 2, 128, 0, true}}) {
    RowTensor t = rows(c.B, c.L, c.R, c.G, c.X, c.pad);
    if (c.shared_ranks) {  // (B, L, G, X) read by every rank
      t.s_rank = 0, t.s_token = c.G * t.s_head, t.s_batch = c.L * t.s_token;
    } else {
      t.s_token += 8;  // rows of a token not evenly spaced: no 2-D collapse, still a 5-D view
      t.s_batch = c.L * t.s_token;
    }
    const int C = 64 / static_cast<int>(c.R);
    const RowTileView rv = rank_tile_view(t, 0x1000, static_cast<int>(c.X) + 8, C);
    ASSERT_EQ(rv.error, "");
    const TmaView& v = rv.view;
    ASSERT_EQ(v.box_bytes(), 64u * (c.X + 8) * 2);  // 64 rows of the padded pitch
    for (int b = 0; b < c.B; ++b)
      for (int g = 0; g < c.G; ++g)
        for (int64_t c0 = 0; c0 < c.L; c0 += C)
          for (uint32_t it = 0; it < v.box[2]; ++it)
            for (uint32_t r = 0; r < v.box[1]; ++r)
              for (uint32_t x = 0; x < v.box[0]; ++x) {
                const int64_t at[5] = {x, r, c0 + it, g, b};
                bool inside = true;
                for (int d = 0; d < 5; ++d) inside = inside && static_cast<uint64_t>(at[d]) < v.dim[d];
                ASSERT_EQ(inside, x < c.X && c0 + it < c.L);
                if (!inside) continue;
                const uint64_t want = 2 * static_cast<uint64_t>(b * t.s_batch + (c0 + it) * t.s_token +
                                                                r * t.s_rank + g * t.s_head + x);
                ASSERT_EQ(tma_view_offset(v, at), want);
              }
  }
}

TEST(TmaView, RefusesWhatTheCopyEngineCannotTake) {
  const RowTensor good = rows(2, 64, 4, 2, 128, 0);
  EXPECT_EQ(row_tile_view(good, 0x1000, 64, 64, 128).error, "");
  // Rows of a token not evenly spaced: (token, rank) does not collapse.
  RowTensor gap = good;
  gap.s_token += 8;
  EXPECT_NE(row_tile_view(gap, 0x1000, 64, 64, 128).error.find("rows do not collapse"), std::string::npos);
  // Strides that are not multiples of 16 bytes.
  RowTensor odd = rows(2, 64, 1, 4, 128, 4);  // head stride 132 elements = 264 bytes
  EXPECT_NE(row_tile_view(odd, 0x1000, 64, 64, 128).error.find("stride of dimension 2 is 264 bytes"),
            std::string::npos);
  // Base address.
  EXPECT_NE(row_tile_view(good, 0x1002, 64, 64, 128).error.find("not 16-byte aligned"), std::string::npos);
  // A non-contiguous inner dimension.
  RowTensor strided = good;
  strided.s_col = 2;
  EXPECT_NE(row_tile_view(strided, 0x1000, 64, 64, 128).error.find("column stride 2"), std::string::npos);
  // Boxes: rows of 256 bytes under the 128-byte swizzle, more than 256 rows, inner rows not a
  // multiple of 16 bytes.
  EXPECT_NE(row_tile_view(good, 0x1000, 64, 128, 128).error.find("exceeds the 128-byte swizzle span"),
            std::string::npos);
  EXPECT_EQ(row_tile_view(good, 0x1000, 64, 128, 0).error, "");
  EXPECT_NE(row_tile_view(good, 0x1000, 512, 64, 128).error.find("box dimension 1 is 512"), std::string::npos);
  EXPECT_NE(row_tile_view(good, 0x1000, 64, 4, 0).error.find("not a multiple of 16"), std::string::npos);
}

// The 128-byte swizzle permutes the eight 16-byte chunks of each 128-byte row (chunk c of row r
// lands at chunk c ^ (r % 8)), keeps bytes inside their chunk and rows inside their 1024-byte
// group, and so spreads any column of 16-byte chunks of 8 consecutive rows over all 8 chunk
// positions (the bank groups an ldmatrix of 8 rows reads).
TEST(TmaView, Swizzle128PermutesChunksWithinRows) {
  std::set<uint32_t> seen;
  for (uint32_t lin = 0; lin < 4096; ++lin) {
    const uint32_t s = swizzle128(lin);
    const uint32_t row = lin / 128, chunk = (lin / 16) % 8;
    EXPECT_EQ(s / 128, row);
    EXPECT_EQ(s % 16, lin % 16);
    EXPECT_EQ((s / 16) % 8, chunk ^ (row % 8));
    seen.insert(s);
  }
  EXPECT_EQ(seen.size(), 4096u);
  for (uint32_t chunk = 0; chunk < 8; ++chunk) {
    std::set<uint32_t> pos;
    for (uint32_t row = 0; row < 8; ++row) pos.insert((swizzle128(row * 128 + chunk * 16) / 16) % 8);
    EXPECT_EQ(pos.size(), 8u) << "chunk " << chunk;
  }
}

}  // namespace
}  // namespace mamba3::cuda
