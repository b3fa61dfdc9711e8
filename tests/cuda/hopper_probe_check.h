// Inputs, views and checks of the Hopper probe (hopper_probe.cuh), shared by the GPU test and
// the emulated one: row tensors q, k (B, L, R, G, 128) and v (B, L, R, G, 64) of random bf16,
// optionally with padded head and token strides, and what every output must be.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/common/tma_view.h"

namespace mamba3::test::hopper {

struct ProbeCase {
  const char* name;
  int B, L, R, G;
  int pad;  // extra elements after each (token, rank, group) row: a strided, non-packed tensor
  bool broadcast_groups = false;  // every group reads the same rows (group stride 0)
};

inline uint16_t to_bf16_bits(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_value(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct RowData {
  cuda::RowTensor t;
  std::vector<uint16_t> bits;  // the whole strided buffer; gaps are NaN bits (never read)
  float at(int b, int l, int r, int g, int x) const {
    return bf16_value(bits[b * t.s_batch + l * t.s_token + r * t.s_rank + g * t.s_head + x]);
  }
};

inline RowData make_rows(const ProbeCase& c, int cols, uint32_t seed) {
  RowData d;
  cuda::RowTensor& t = d.t;
  t.batch = c.B, t.tokens = c.L, t.ranks = c.R, t.heads = c.G, t.cols = cols;
  t.s_col = 1, t.s_head = cols + c.pad, t.s_rank = c.G * t.s_head, t.s_token = c.R * t.s_rank;
  if (c.broadcast_groups) t.s_head = 0, t.s_rank = cols + c.pad, t.s_token = c.R * t.s_rank;
  t.s_batch = static_cast<int64_t>(c.L) * t.s_token;
  t.elem_bytes = 2;
  d.bits.assign(static_cast<size_t>(c.B) * t.s_batch, 0x7fc0);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (int b = 0; b < c.B; ++b)
    for (int l = 0; l < c.L; ++l)
      for (int r = 0; r < c.R; ++r)
        for (int g = 0; g < c.G; ++g)
          for (int x = 0; x < cols; ++x)
            d.bits[b * t.s_batch + l * t.s_token + r * t.s_rank + g * t.s_head + x] = to_bf16_bits(u(rng));
  return d;
}

// Chunks of 64 rows per (batch, group).
inline int probe_chunks(const ProbeCase& c) { return (c.L * c.R + 63) / 64; }

struct ProbeResult {
  std::vector<uint16_t> q, qf;  // (cells, 64, 128) bf16 bits
  std::vector<float> s, y;      // (cells, 64, 64)
};

// Every output against the inputs: tiles exactly (zero rows past the end), products within the
// worst-case error of n fp32 additions even with truncating adds, n * 2^-23 * sum |terms| (the
// bf16 products themselves are exact in fp32; n = 128 for S, 64 for Y).
inline void check_probe(const ProbeCase& c, const RowData& q, const RowData& k, const RowData& v,
                        const ProbeResult& out) {
  const int chunks = probe_chunks(c);
  int bad = 0;
  auto report = [&](const std::string& what) {
    if (++bad <= 8) ADD_FAILURE() << c.name << ": " << what;
  };
  for (int b = 0; b < c.B; ++b)
    for (int g = 0; g < c.G; ++g)
      for (int ch = 0; ch < chunks; ++ch) {
        const int64_t cell = (static_cast<int64_t>(b) * c.G + g) * chunks + ch;
        auto val = [&](const RowData& d, int row, int x) {
          const int gr = ch * 64 + row, l = gr / c.R, r = gr % c.R;
          return l < c.L ? d.at(b, l, r, g, x) : 0.f;
        };
        for (int i = 0; i < 64; ++i)
          for (int x = 0; x < 128; ++x) {
            const float want = val(q, i, x);
            const float got = bf16_value(out.q[cell * 64 * 128 + i * 128 + x]);
            const float gotf = bf16_value(out.qf[cell * 64 * 128 + i * 128 + x]);
            if (got != want)
              report("q tile (" + std::to_string(i) + ", " + std::to_string(x) + ") of cell " +
                     std::to_string(cell) + ": " + std::to_string(got) + " != " + std::to_string(want));
            if (gotf != want)
              report("ldmatrix q tile (" + std::to_string(i) + ", " + std::to_string(x) + ") of cell " +
                     std::to_string(cell) + ": " + std::to_string(gotf) + " != " + std::to_string(want));
          }
        // A 64 x 64 product `got` against the sum over n terms a(i, t) b(t, j) in float64.
        auto product = [&](const char* name, const std::vector<float>& got, int n, auto a, auto b) {
          for (int i = 0; i < 64; ++i)
            for (int j = 0; j < 64; ++j) {
              double ref = 0, mag = 0;
              for (int t = 0; t < n; ++t) {
                const double pr = static_cast<double>(a(i, t)) * b(t, j);
                ref += pr, mag += std::fabs(pr);
              }
              const float g = got[cell * 64 * 64 + i * 64 + j];
              if (!(std::fabs(g - ref) <= n * 0x1p-23 * mag))
                report(std::string(name) + "(" + std::to_string(i) + ", " + std::to_string(j) +
                       ") of cell " + std::to_string(cell) + ": " + std::to_string(g) + " vs " +
                       std::to_string(ref));
            }
        };
        product("S", out.s, 128, [&](int i, int x) { return val(q, i, x); },
                [&](int x, int j) { return val(k, j, x); });
        // Y from the kernel's own S (rounded to bf16 as the kernel rounds it).
        product("Y", out.y, 64,
                [&](int i, int j) { return bf16_value(to_bf16_bits(out.s[cell * 64 * 64 + i * 64 + j])); },
                [&](int j, int x) { return val(v, j, x); });
      }
  EXPECT_EQ(bad, 0) << c.name << ": " << bad << " mismatches";
}

// Cases: SISO with a partial last chunk, MIMO R = 4 and R = 8 (16 and 8 tokens per chunk),
// strided rows, several batches and groups, and groups broadcast from one set of rows (a
// zero stride, as an expanded torch tensor has).
inline std::vector<ProbeCase> probe_cases() {
  return {{"siso_partial", 2, 100, 1, 2, 0},
          {"mimo_r4", 1, 37, 4, 1, 0},
          {"mimo_r8_strided", 2, 19, 8, 2, 8},
          {"siso_strided", 1, 64, 1, 3, 24},
          {"broadcast_groups", 2, 70, 2, 3, 0, true}};
}

}  // namespace mamba3::test::hopper
