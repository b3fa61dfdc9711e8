// What the bulk tensor copy engine (TMA) is asked to move, as plain numbers (DESIGN.md §3):
// a view of a global tensor (rank, dimensions, byte strides), the box one copy moves, and the
// swizzle it lands with in shared memory. Plain C++ (no CUDA headers): the views are built,
// checked against the copy engine's rules and unit-tested on a machine without a GPU
// (tests/test_tma_view.cpp); tma_host.h encodes a checked view into the driver's tensor map.
//
// Row tiles. The kernels read q and k as (B, L, [R,] G, N) and v, z as (B, L, H, P): per (batch,
// group or head) a sequence of L·R rows of X elements, MIMO row t·R + r (DESIGN.md §2.5). A
// chunk's tile (C tokens, R ranks, X columns) is 3-D; row_tile_view expresses the same bytes
// as a 2-D box of (C·R) rows over a rank-4 view (columns, rows = L·R, heads, batch) whose row
// dimension collapses (token, rank). That is a layout rewrite only, legal where a token's rows
// are evenly spaced (token stride = R · rank stride); row_tile_coords is the index map.
#pragma once

#include <cstdint>
#include <string>

// The swizzle map is also device code (tma.cuh); the rest is host only.
#if defined(__CUDACC__)
#define MAMBA3_TMA_HD __host__ __device__
#else
#define MAMBA3_TMA_HD
#endif

namespace mamba3::cuda {

inline constexpr int kTmaMaxRank = 5;

struct TmaView {
  int rank = 0;
  int elem_bytes = 0;                 // 2 (bf16, fp16) or 4 (fp32)
  uint64_t dim[kTmaMaxRank] = {};     // elements, innermost first
  uint64_t stride[kTmaMaxRank] = {};  // bytes; stride[0] is elem_bytes (dense inner dimension)
  uint32_t box[kTmaMaxRank] = {};     // elements per box dimension
  int swizzle = 0;                    // 0 (none) or 128 (bytes)

  uint32_t box_bytes() const {
    uint64_t b = static_cast<uint64_t>(elem_bytes);
    for (int i = 0; i < rank; ++i) b *= box[i];
    return static_cast<uint32_t>(b);
  }
};

// The copy engine's rules for a tiled view over a global address `base` (those of
// cuTensorMapEncodeTiled): "" when legal, otherwise what is wrong.
inline std::string tma_view_error(const TmaView& v, uintptr_t base) {
  auto n = [](uint64_t x) { return std::to_string(x); };
  if (v.rank < 1 || v.rank > kTmaMaxRank) return "rank " + n(v.rank) + " is not in 1..5";
  if (v.elem_bytes != 2 && v.elem_bytes != 4)
    return "element size " + n(v.elem_bytes) + " bytes is not 2 or 4";
  if (base % 16 != 0) return "global address is not 16-byte aligned";
  if (v.stride[0] != static_cast<uint64_t>(v.elem_bytes))
    return "innermost dimension is not contiguous (stride " + n(v.stride[0]) + " bytes)";
  for (int i = 0; i < v.rank; ++i) {
    if (v.dim[i] == 0 || v.dim[i] > (uint64_t{1} << 32))
      return "dimension " + n(i) + " has size " + n(v.dim[i]) + " (must be in 1..2^32)";
    if (v.box[i] == 0 || v.box[i] > 256)
      return "box dimension " + n(i) + " is " + n(v.box[i]) + " (must be in 1..256)";
    if (i > 0 && (v.stride[i] % 16 != 0 || v.stride[i] >= (uint64_t{1} << 40)))
      return "stride of dimension " + n(i) + " is " + n(v.stride[i]) +
             " bytes (must be a multiple of 16 below 2^40)";
  }
  const uint64_t inner = static_cast<uint64_t>(v.box[0]) * v.elem_bytes;
  if (inner % 16 != 0) return "inner box row of " + n(inner) + " bytes is not a multiple of 16";
  if (v.swizzle != 0 && v.swizzle != 128) return "swizzle " + n(v.swizzle) + " is not 0 or 128";
  if (v.swizzle == 128 && inner > 128)
    return "inner box row of " + n(inner) + " bytes exceeds the 128-byte swizzle span";
  return "";
}

// A tensor of rows as the kernels index it (strides in elements; ranks = 1 and s_rank unused
// without a rank dimension).
struct RowTensor {
  int64_t batch = 1, tokens = 0, ranks = 1, heads = 1, cols = 0;
  int64_t s_batch = 0, s_token = 0, s_rank = 0, s_head = 0, s_col = 1;
  int elem_bytes = 2;
};

struct RowTileView {
  TmaView view;
  std::string error;  // "" when the view is legal
};

// What both views of a row tensor require of it: sizes, and a dense column dimension ("" when
// fine).
inline std::string row_tensor_error(const RowTensor& t) {
  if (t.ranks < 1 || t.tokens < 0 || t.batch < 1 || t.heads < 1 || t.cols < 1)
    return "empty or negative row tensor dimensions";
  if (t.s_col != 1) return "column stride " + std::to_string(t.s_col) + " is not 1";
  return "";
}

// Size-1 dimensions may carry any stride (the caller's tensor may be a broadcast view): the copy
// engine still checks them, so they get a legal one.
inline void legal_unit_strides(TmaView& v) {
  for (int i = 1; i < v.rank; ++i)
    if (v.dim[i] == 1) v.stride[i] = 16;
}

// The rank-4 view (columns, rows = tokens · ranks, heads, batch) of a row tensor, with a box of
// box_rows rows and box_cols columns. Illegal where a token's rows are not evenly spaced or the
// copy engine's rules fail; the error then names the reason.
inline RowTileView row_tile_view(const RowTensor& t, uintptr_t base, int box_rows, int box_cols,
                                 int swizzle) {
  RowTileView r;
  r.error = row_tensor_error(t);
  if (!r.error.empty()) return r;
  if (t.ranks > 1 && t.s_token != t.ranks * t.s_rank) {
    r.error = "token stride " + std::to_string(t.s_token) + " is not R x rank stride (R = " +
              std::to_string(t.ranks) + ", rank stride " + std::to_string(t.s_rank) +
              "): a token's rows do not collapse into one row dimension";
    return r;
  }
  TmaView& v = r.view;
  const uint64_t eb = static_cast<uint64_t>(t.elem_bytes);
  v.rank = 4;
  v.elem_bytes = t.elem_bytes;
  v.swizzle = swizzle;
  v.dim[0] = static_cast<uint64_t>(t.cols);
  v.dim[1] = static_cast<uint64_t>(t.tokens * t.ranks);
  v.dim[2] = static_cast<uint64_t>(t.heads);
  v.dim[3] = static_cast<uint64_t>(t.batch);
  v.stride[0] = eb;
  v.stride[1] = static_cast<uint64_t>(t.ranks > 1 ? t.s_rank : t.s_token) * eb;
  v.stride[2] = static_cast<uint64_t>(t.s_head) * eb;
  v.stride[3] = static_cast<uint64_t>(t.s_batch) * eb;
  v.box[0] = static_cast<uint32_t>(box_cols);
  v.box[1] = static_cast<uint32_t>(box_rows);
  v.box[2] = v.box[3] = 1;
  if (v.dim[1] == 0) v.dim[1] = 1;  // an empty sequence: nothing is copied, the map stays legal
  legal_unit_strides(v);
  r.error = tma_view_error(v, base);
  return r;
}

// The rank-5 view (columns, ranks, tokens, heads, batch) of a row tensor with a box of
// box_cols columns, all R ranks and C tokens: the same (C·R) rows as row_tile_view's box, for
// any strides (no collapse needed). box_cols may exceed the tensor's columns: the copy engine
// writes zeros for the columns past them, so the rows land in shared memory with a padded
// pitch of box_cols elements. Coordinates of a chunk: (0, 0, c0, g, b).
inline RowTileView rank_tile_view(const RowTensor& t, uintptr_t base, int box_cols, int C) {
  RowTileView r;
  r.error = row_tensor_error(t);
  if (!r.error.empty()) return r;
  TmaView& v = r.view;
  const uint64_t eb = static_cast<uint64_t>(t.elem_bytes);
  v.rank = 5;
  v.elem_bytes = t.elem_bytes;
  v.dim[0] = static_cast<uint64_t>(t.cols);
  v.dim[1] = static_cast<uint64_t>(t.ranks);
  v.dim[2] = static_cast<uint64_t>(t.tokens > 0 ? t.tokens : 1);
  v.dim[3] = static_cast<uint64_t>(t.heads);
  v.dim[4] = static_cast<uint64_t>(t.batch);
  v.stride[0] = eb;
  v.stride[1] = static_cast<uint64_t>(t.s_rank) * eb;
  v.stride[2] = static_cast<uint64_t>(t.s_token) * eb;
  v.stride[3] = static_cast<uint64_t>(t.s_head) * eb;
  v.stride[4] = static_cast<uint64_t>(t.s_batch) * eb;
  legal_unit_strides(v);
  v.box[0] = static_cast<uint32_t>(box_cols);
  v.box[1] = static_cast<uint32_t>(t.ranks);
  v.box[2] = static_cast<uint32_t>(C);
  v.box[3] = v.box[4] = 1;
  r.error = tma_view_error(v, base);
  return r;
}

// The index map: coordinates (innermost first) of the box holding rows [c0·R, c0·R + box_rows)
// and columns [col0, col0 + box_cols) of (batch b, head g), chunk starting at token c0.
inline void row_tile_coords(int b, int g, int64_t c0, int R, int col0, int32_t (&c)[4]) {
  c[0] = col0;
  c[1] = static_cast<int32_t>(c0 * R);
  c[2] = g;
  c[3] = b;
}

// Byte offset, from the view's base, of the element at coordinates c (innermost first).
inline uint64_t tma_view_offset(const TmaView& v, const int64_t* c) {
  uint64_t o = 0;
  for (int i = 0; i < v.rank; ++i) o += static_cast<uint64_t>(c[i]) * v.stride[i];
  return o;
}

// Where byte `lin` of a box (rows of 128 bytes, laid out one after another) lands in shared
// memory under the 128-byte swizzle, relative to a 1024-byte aligned base: the 16-byte chunk
// index (bits 4-6) XOR the row index mod 8 (bits 7-9). The kernels' ldmatrix and wgmma
// addresses follow the same map.
MAMBA3_TMA_HD constexpr uint32_t swizzle128(uint32_t lin) { return lin ^ ((lin >> 3) & 0x70u); }

}  // namespace mamba3::cuda
