// A probe of the Hopper primitives (src/cuda/common/tma.cuh) on the tiles the chunk kernels
// use, shared by the GPU test (tests/cuda/test_hopper.cu) and its CPU emulation
// (tests/emu/test_hopper_emu.cpp). One CTA of one warpgroup per (batch, group, chunk of 64
// rows):
//   - TMA copies the chunk's q and k tiles (64 rows x 128 columns, as two 64-column panels)
//     and a 64 x 64 v tile of row tensors (tma_view.h's row_tile_view: MIMO rows t·R + r as one
//     row dimension) into 128-byte swizzled shared memory, completing on one mbarrier;
//   - out_q: the q tile read back through the swizzle map (sw128_off), element by element;
//   - out_qf: the q tile read back through ldmatrix at swizzled row addresses (the mma.sync
//     operand path), written to its logical positions;
//   - out_s = Q K^T by 8 wgmma m64n64k16 (both operands K-major from shared memory);
//   - out_y = bf16(out_s) V by 4 wgmma with A from registers (the accumulator's columns as
//     bf16 pairs) and B = the v tile MN-major (v rows are k, columns n).
// Rows past the tensor's end come in as zeros (the copy engine's out-of-view fill).
#pragma once

#include "cuda/common/tma.cuh"

namespace mamba3::cuda::probe {

inline constexpr int kRows = 64, kN = 128, kP = 64, kThreads = 128;
inline constexpr int kPanelBytes = kRows * 128;               // 64 rows of 64 bf16
inline constexpr int kSmemBytes = 1024 + 5 * kPanelBytes + 64;  // alignment, q, k (2 each), v, mbarrier

struct ProbeOut {
  __nv_bfloat16* q;   // (chunks, 64, 128)
  __nv_bfloat16* qf;  // (chunks, 64, 128)
  float* s;           // (chunks, 64, 64)
  float* y;           // (chunks, 64, 64)
};

// Grid: (chunks per (b, g), G, B); rows per chunk 64 (R ranks: 64 / R tokens).
__global__ void __launch_bounds__(kThreads)
    hopper_probe_kernel(const __grid_constant__ TmaMap qmap, const __grid_constant__ TmaMap kmap,
                        const __grid_constant__ TmaMap vmap, ProbeOut out) {
  extern __shared__ __align__(16) unsigned char probe_smem[];
  const uint32_t pad = (1024u - (smem_addr(probe_smem) & 1023u)) & 1023u;
  unsigned char* base = probe_smem + pad;
  unsigned char* qs = base;                    // two panels: columns 0..63, 64..127
  unsigned char* ks = base + 2 * kPanelBytes;  // two panels
  unsigned char* vs = base + 4 * kPanelBytes;
  uint64_t* bar = reinterpret_cast<uint64_t*>(base + 5 * kPanelBytes);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int chunk = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int64_t cell = (static_cast<int64_t>(b) * gridDim.y + g) * gridDim.x + chunk;
  if (tid == 0) {
    mbar_init(bar, 1);
    mbar_init_fence();
  }
  __syncthreads();
  if (tid == 0) {
    mbar_arrive_expect_tx(bar, 5 * kPanelBytes);
    const int row0 = chunk * kRows;  // the chunk's first row (token c0 = row0 / R)
    for (int h = 0; h < 2; ++h) {
      tma_load_4d(qs + h * kPanelBytes, &qmap, 64 * h, row0, g, b, bar);
      tma_load_4d(ks + h * kPanelBytes, &kmap, 64 * h, row0, g, b, bar);
    }
    tma_load_4d(vs, &vmap, 0, row0, g, b, bar);
  }
  mbar_wait(bar, 0);

  // out_q through the swizzle map.
  for (int i = tid; i < kRows * kN; i += kThreads) {
    const int r = i / kN, c = i % kN;
    const auto* panel = qs + (c / 64) * kPanelBytes;
    out.q[cell * kRows * kN + i] =
        *reinterpret_cast<const __nv_bfloat16*>(panel + sw128_off(r, c % 64));
  }
  // out_qf through ldmatrix: warp w loads the A fragments of rows 16w.. for the 8 k16 steps.
  for (int s = 0; s < kN / 16; ++s) {
    const int row = 16 * warp + (lane & 15), col = (s % 4) * 16 + (lane >> 4) * 8;
    uint32_t a[4];
    ldmatrix_x4(a, qs + (s / 4) * kPanelBytes + sw128_off(row, col));
    const int g8 = lane >> 2, t4 = lane & 3;
    for (int e = 0; e < 4; ++e) {
      const int rr = 16 * warp + g8 + (e & 1) * 8, cc = 16 * s + 2 * t4 + (e >> 1) * 8;
      *reinterpret_cast<uint32_t*>(out.qf + cell * kRows * kN + rr * kN + cc) = a[e];
    }
  }

  // S = Q K^T.
  float d[32];
  wgmma_fence();
  for (int s = 0; s < kN / 16; ++s) {
    const uint64_t da = wgmma_desc_sw128(qs + (s / 4) * kPanelBytes) + 2 * (s % 4);
    const uint64_t db = wgmma_desc_sw128(ks + (s / 4) * kPanelBytes) + 2 * (s % 4);
    wgmma_m64n64k16_ss<false>(d, da, db, s > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  const int g8 = lane >> 2, t4 = lane & 3;
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int r = 16 * warp + g8 + (e >> 1) * 8, c = 8 * j + 2 * t4 + (e & 1);
      out.s[cell * kRows * kP + r * kP + c] = d[4 * j + e];
    }

  // Y = bf16(S) V: k-step s takes S's columns 16s..16s+15 (accumulator tiles 2s, 2s + 1).
  float y[32];
  for (int i = 0; i < 32; ++i) y[i] = 0.f;
  wgmma_fence();
  for (int s = 0; s < kP / 16; ++s) {
    const uint32_t a[4] = {pack_bf16(d[8 * s + 0], d[8 * s + 1]), pack_bf16(d[8 * s + 2], d[8 * s + 3]),
                           pack_bf16(d[8 * s + 4], d[8 * s + 5]), pack_bf16(d[8 * s + 6], d[8 * s + 7])};
    const uint64_t db = wgmma_desc_sw128(vs) + (2048 >> 4) * s;
    wgmma_m64n64k16_rs<true>(y, a, db, true);
  }
  wgmma_commit();
  wgmma_wait<0>();
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int r = 16 * warp + g8 + (e >> 1) * 8, c = 8 * j + 2 * t4 + (e & 1);
      out.y[cell * kRows * kP + r * kP + c] = y[4 * j + e];
    }
}

}  // namespace mamba3::cuda::probe
