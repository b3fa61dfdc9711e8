// The tensor-core chunk_out kernel: y of a chunk recomputed from its tile record and start state,
// then the output stage's adjoint (the math of bwd_chunk_out_kernel in bwd_kernels.cuh), with y
// kept in the mma accumulators instead of an fp32 shared tile.
//
// Warp tiling as chunk_grad_tc (bwd_tc_grad.cuh): 8 warps, warp w owns rows [16 (w >> 1), + 16)
// and half of the P columns, two blocks of P / 4 columns P / 2 apart (grad_col). Every element
// (row, column) of y has one owning thread, which evaluates the output stage's adjoint there
// once. Y = e (Q S_prev^T) + (A o M) V + D v psi accumulates in one set of registers (the first
// product's rows scaled by e in registers, then the k loop continues); the cotangent of out and
// z are loaded from global memory straight into the fragment layout. Row sums (the norm's rstd
// and mean(dyn w y)) are shuffles across tq plus one shared slot per column half; grad.z sums a
// token's R rows by shuffles (token_rows_sum); the d zeta / d phi / d norm-weight partials are
// rank column sums (rank_column_sums) combined over the 4 row tiles in a fixed order. dy goes to
// the workspace (fp32) and, times e, to the bf16 operand of the state cotangent increment
// (e dY)^T Q, which stays a tc_gemm into global memory. Deterministic; no atomics.
//
// Shared memory at N = 128, P = 64: q, k and the state operand 17 KB each, A o M, v psi, the raw
// v and e dy 9 KB each, scalars and partial slots: ~95 KB, two CTAs per SM.
#pragma once

#include "cuda/chunk_bwd/bwd_tc_grad.cuh"

namespace mamba3::cuda::bwd {

// The fragment's elements of a (rows, X) bf16 tensor as raw pairs: u[j][hr] holds columns
// grad_col(j, 0), + 1 of row i0 + g + 8 hr (its element offset off(i) + column; every off(i)
// even, unit column stride: bf16_pairs), 0 for rows i >= mr. One 4-byte load per pair, issued
// early (its latency hidden behind the products) and unpacked by frag_unpack.
template <int X, typename FO>
__device__ __forceinline__ void frag_load_pairs(uint32_t (&u)[X / 16][2], const DTensor& t, FO off,
                                                int i0, int cg, int lane, int mr) {
  const int g = lane >> 2, tq = lane & 3;
  const unsigned int* row[2];  // the two rows' first pairs: each load an offset from them
#pragma unroll
  for (int hr = 0; hr < 2; ++hr)
    row[hr] = static_cast<const unsigned int*>(t.data) +
              ((off(i0 + g + 8 * hr) + grad_col<X>(cg, 0, 0, tq)) >> 1);
#pragma unroll
  for (int j = 0; j < X / 16; ++j)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
      u[j][hr] = i0 + g + 8 * hr < mr ? __ldg(row[hr] + (grad_col_step<X>(j) >> 1)) : 0u;
}
template <int X>
__device__ __forceinline__ void frag_unpack(const uint32_t (&u)[X / 16][2], float (&v)[X / 16][4]) {
#pragma unroll
  for (int j = 0; j < X / 16; ++j)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      v[j][2 * hr] = __uint_as_float(u[j][hr] << 16);
      v[j][2 * hr + 1] = __uint_as_float(u[j][hr] & 0xffff0000u);
    }
}

// The fragment's elements of a (rows, X) tensor of any dtype and strides: v[j][e] = t[off(i) +
// column sx], 0 for rows i >= mr.
template <int X, typename FO>
__device__ __forceinline__ void frag_load(float (&v)[X / 16][4], const DTensor& t, FO off, int i0,
                                          int cg, int lane, int mr) {
  const int g = lane >> 2, tq = lane & 3;
  const int64_t sx = t.stride[t.ndim - 1];
  with_load_ro(t, [&](auto ld) {
#pragma unroll
    for (int j = 0; j < X / 16; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + g + 8 * (e >> 1);
        v[j][e] = i < mr ? ld(off(i) + grad_col<X>(cg, j, e, tq) * sx) : 0.f;
      }
  });
}

// Row sums of the fragment's rows g, g + 8 over the block's P columns: s[hr] added across tq,
// through slot (two column halves of 64 rows) and a barrier; returns the full sums in s.
__device__ __forceinline__ void out_row_sums(float (&s)[2], float* slot, int i0, int cg,
                                             int lane) {
  const int g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    s[hr] += __shfl_xor_sync(0xffffffffu, s[hr], 1);
    s[hr] += __shfl_xor_sync(0xffffffffu, s[hr], 2);
    if (tq == 0) slot[cg * 64 + i0 + g + 8 * hr] = s[hr];
  }
  __syncthreads();
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int i = i0 + g + 8 * hr;
    s[hr] = slot[i] + slot[64 + i];
  }
}

// grid (chunks, H), kThreads: see the top of this file. P = 128 runs one CTA per SM (shared
// memory ~128 KB at N = 128, and 32-float accumulators), as chunk_grad_tc. kSavedY: y comes from
// the forward's saved buffer (Workspace::y, the forward's own fp32 values) and only the q tile,
// the scalars and the raw v are fetched: no S_prev, no k or v psi tiles, no products for y
// (layout kTcOutY: ~41 KB at N = 128, P = 64). Still two CTAs per SM: capped at 80 registers for
// three, ptxas spilled 8 (R = 1) to 112 (R = 8) bytes at P = 64 (2026-11-30).
template <int kP, int kR, bool kSavedY>
__global__ void __launch_bounds__(kThreads, grad_tc_min_blocks(kP))
    bwd_chunk_out_tc_kernel(BwdParams bp, TcSmem lay) {
  M3B_DYNAMIC_SMEM_TC(sm);
  Chunk ck;
  if (!find_chunk(bp, blockIdx.x, blockIdx.y, &ck)) return;
  const CoreParams& p = bp.p;
  constexpr int P = kP, R = kR, lr = log2_const(kR), kRows = kMaxRows;
  constexpr int kNTp = P / 16, kNTs = kRows / 16;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tq = lane & 3, cg = warp & 1, rt = warp >> 1, i0 = 16 * rt;
  const int N = p.N, mr = ck.mr, h = ck.h;
  const int kr = (mr + 15) & ~15;  // rows rounded up to whole 16-row tiles (zero past mr)
  const bool rows_live = i0 < kr;
  float* psi = reinterpret_cast<float*>(sm + lay.par);
  float* zeta = psi + R * P;
  float* phi = zeta + R * P;
  float* wn = phi + R * P;
  float* red = reinterpret_cast<float*>(sm + lay.red);
  const int64_t cell = static_cast<int64_t>(ck.cid) * p.H + h;
  const float* sprev = bp.ws.s_prev + cell * P * N;
  bf16* Sb = reinterpret_cast<bf16*>(sm + lay.s);
  // S_prev is staged below, after the record's copies issue (MIMO: as chunk_grad_tc).
  if constexpr (R > 1 && !kSavedY)
    if (tid == 0) prefetch_l2(sprev, P * N * 4);
  // The loader's output (chunk_state_tc or the forward); with a saved y the q tile and scalars.
  tc_chunk_tiles<true, kSavedY>(bp, ck, lay, sm, tid);
  tc_fetch_raw_v(bp, ck, lay, sm, tid);
  load_head_params(p, h, psi, zeta, phi, wn, tid, kThreads);
  if constexpr (!kSavedY) stage_state_bf16(sprev, Sb, P, N, lay.qp, tid);
  cp_async_wait_all();
  __syncthreads();
  if (!kSavedY && tc_v_rows_need_psi(bp)) {  // v psi of a record without the PsiV cache
    tc_scale_v_rows(bp, lay, sm, psi, ck.mr, tid);
    __syncthreads();
  }
  const float* sc = reinterpret_cast<const float*>(sm + lay.scal);
  const float* cs = sc + kCs * kMaxRows;
  const float* ex = sc + kE * kMaxRows;
  const float* w = sc + kW * kMaxRows;
  const float* gam = sc + kGam * kMaxRows;
  const bf16* Q = reinterpret_cast<const bf16*>(sm + lay.q);
  const bf16* K = reinterpret_cast<const bf16*>(sm + lay.k);
  const bf16* V = reinterpret_cast<const bf16*>(sm + lay.v);
  bf16* AM = reinterpret_cast<bf16*>(sm + lay.am);
  bf16* DYb = reinterpret_cast<bf16*>(sm + lay.dy);
  const int qp = lay.qp, vp = lay.vp, ap = lay.ap;
  const float dskip = p.d.defined() ? dload_ro(p.d, h * p.d.stride[0]) : 0.f;
  // v psi in fp32 from the raw bf16 input rows (lay.vr): the D skip and its gradient stay exact.
  const unsigned short* VRu = reinterpret_cast<const unsigned short*>(sm + lay.vr);
  auto vpsi = [&](int row, int x) {
    return __uint_as_float(static_cast<unsigned int>(VRu[(row >> lr) * vp + x]) << 16) *
           psi[(row & (R - 1)) * P + x];
  };
  const int row0 = i0 + g, row1 = i0 + g + 8;

  // A o M = (Q K^T) o M on the causal 16-column groups; every element of the warp's rows written
  // (zero above the diagonal and past the chunk): the (A o M) V product reads columns < i0 + 16.
  if constexpr (!kSavedY) {
    float ra[kNTs][4] = {};
    const unsigned live = grad_causal_groups<kRows>(rows_live, i0, cg);
    grad_mma<kRows, false, false>(ra, Q, qp, K, qp, i0, cg, 0, N, live, lane);
#pragma unroll
    for (int j = 0; j < kNTs; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + g + 8 * (e >> 1), col = grad_col<kRows>(cg, j, e, tq);
        const int ti = i >> lr, tj = col >> lr;
        float a = 0.f;
        if (i < mr && col < mr && tj <= ti) a = ra[j][e] * mask_coef<true>(cs, w, gam, ti, tj);
        AM[i * ap + col] = __float2bfloat16_rn(a);
      }
  }
  // The cotangent of out (per token; per row for per-rank output) and z (per token) at the
  // fragment's elements: bf16 pairs are loaded now, their latency hidden behind the products.
  const bool has_z = p.z.defined(), norm = p.norm_weight.defined(), reduce = !p.per_rank_out;
  const int64_t l0 = ck.begin + ck.t0;
  const DTensor& go = bp.d_out;
  const int64_t go0 = ck.b * go.stride[0] + l0 * go.stride[1] + h * go.stride[reduce ? 2 : 3];
  const int64_t go_rank = reduce ? 0 : go.stride[2];
  auto go_off = [&](int i) { return go0 + (i >> lr) * go.stride[1] + (i & (R - 1)) * go_rank; };
  const DTensor& z = p.z;
  const int64_t z0 = has_z ? ck.b * z.stride[0] + l0 * z.stride[1] + h * z.stride[2] : 0;
  auto z_off = [&](int i) { return z0 + (i >> lr) * z.stride[1]; };
  const bool go_pairs = bf16_pairs(go, go0, go.stride[1], go_rank);
  const bool z_pairs = has_z && bf16_pairs(z, z0, z.stride[1], 0);
  uint32_t go_raw[kNTp][2], z_raw[kNTp][2];
  if (go_pairs) frag_load_pairs<P>(go_raw, go, go_off, i0, cg, lane, mr);
  if (z_pairs) frag_load_pairs<P>(z_raw, z, z_off, i0, cg, lane, mr);

  // Y = e (Q S_prev^T) + (A o M) V (key rows k < i0 + 16) + D v psi; or the forward's (fp32
  // pairs, zero past the chunk).
  float c[kNTp][4] = {};
  if constexpr (kSavedY) {
    const float* yrow[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
      yrow[hr] = bp.ws.y + cell * (kRows * P) + (i0 + g + 8 * hr) * P + grad_col<P>(cg, 0, 0, tq);
#pragma unroll
    for (int j = 0; j < kNTp; ++j)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
        if (i0 + g + 8 * hr < mr) {
          const float2 y = __ldcs(reinterpret_cast<const float2*>(yrow[hr] + grad_col_step<P>(j)));
          c[j][2 * hr] = y.x, c[j][2 * hr + 1] = y.y;
        }
  } else {
    const unsigned all = (1u << (P / 32)) - 1;
    grad_mma<P, false, false>(c, Q, qp, Sb, qp, i0, cg, 0, rows_live ? N : 0, all, lane);
    grad_scale_rows<P>(c, row0 < mr ? ex[row0 >> lr] : 0.f, row1 < mr ? ex[row1 >> lr] : 0.f);
    __syncthreads();  // A o M complete
    grad_mma<P, false, true>(c, AM, ap, V, vp, i0, cg, 0, rows_live ? imin(i0 + 16, kr) : 0, all,
                             lane);
    if (dskip != 0.f)
#pragma unroll
      for (int j = 0; j < kNTp; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = i0 + g + 8 * (e >> 1);
          if (i < mr) c[j][e] += dskip * vpsi(i, grad_col<P>(cg, j, e, tq));
        }
  }

  // The output stage's adjoint on the fragment (epilogue_adjoint).
  float gov[kNTp][4], zv[kNTp][4];
  if (go_pairs)
    frag_unpack<P>(go_raw, gov);
  else
    frag_load<P>(gov, go, go_off, i0, cg, lane, mr);
  if (z_pairs)
    frag_unpack<P>(z_raw, zv);
  else if (has_z)
    frag_load<P>(zv, z, z_off, i0, cg, lane, mr);
  else
#pragma unroll
    for (int j = 0; j < kNTp; ++j) zv[j][0] = zv[j][1] = zv[j][2] = zv[j][3] = 0.f;
  auto adjoint = [&](int j, int e, float rs) {
    const int i = i0 + g + 8 * (e >> 1);
    return epilogue_adjoint<true>(p, gov[j][e], zv[j][e], i & (R - 1), grad_col<P>(cg, j, e, tq),
                                  c[j][e], rs, zeta, phi, wn);
  };
  // The fused norm: rstd per row, then xr = mean(dyn w y) per row.
  float rs[2] = {1.f, 1.f}, xr[2] = {0.f, 0.f};
  if (norm) {
    float s[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < kNTp; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[e >> 1] += c[j][e] * c[j][e];
    out_row_sums(s, red + kOutSs, i0, cg, lane);
    rs[0] = rsqrtf(s[0] / P + p.eps), rs[1] = rsqrtf(s[1] / P + p.eps);
#pragma unroll
    for (int j = 0; j < kNTp; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        xr[e >> 1] += adjoint(j, e, rs[e >> 1]).dyn * wn[grad_col<P>(cg, j, e, tq)] * c[j][e];
    out_row_sums(xr, red + kOutXr, i0, cg, lane);
    xr[0] /= P, xr[1] /= P;
  }
  // Per element: the d zeta / d phi / d norm-weight terms (column sums below), grad.z (a sum
  // over the token's R rows), and dy in place of y.
  float szeta[P / 8] = {}, sphi[P / 8] = {}, sw[P / 8] = {}, dd = 0.f;
  const DTensor& gz = bp.g_z;
  const int64_t gz0 = gz.defined() ? ck.b * gz.stride[0] + l0 * gz.stride[1] + h * gz.stride[2] : 0;
  const bool gz_pairs = gz.defined() && bf16_pairs(gz, gz0, gz.stride[1], 0);
  float dzv[kNTp][4];
#pragma unroll
  for (int j = 0; j < kNTp; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = i0 + g + 8 * (e >> 1), x = grad_col<P>(cg, j, e, tq), hr = e >> 1;
      const float y = c[j][e];
      const EpiAdjoint a = adjoint(j, e, rs[hr]);
      szeta[2 * j + (e & 1)] += a.du * zv[j][e];
      sphi[2 * j + (e & 1)] += a.dphi;
      if (norm) sw[2 * j + (e & 1)] += a.dyn * y * rs[hr];
      dzv[j][e] = token_rows_sum<kR>(a.du * zeta[(i & (R - 1)) * P + x]);
      const float dy = i < mr ? (norm ? rs[hr] * (a.dyn * wn[x] - y * rs[hr] * rs[hr] * xr[hr]) : a.dyn)
                              : 0.f;
      if (i < mr) dd += dy * vpsi(i, x);
      c[j][e] = dy;
    }
  // grad.z from the lanes holding a token's first row.
  if (gz.defined()) {
    const bool owner = (g & (R - 1)) == 0;
    if (gz_pairs) {
      __nv_bfloat162* row[2];  // as frag_load_pairs: row pointers, even offsets from them
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
        row[hr] = static_cast<__nv_bfloat162*>(gz.data) +
                  (gz0 + ((i0 + g + 8 * hr) >> lr) * gz.stride[1] + grad_col<P>(cg, 0, 0, tq)) / 2;
#pragma unroll
      for (int j = 0; j < kNTp; ++j)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
          if (owner && i0 + g + 8 * hr < mr)
            row[hr][grad_col_step<P>(j) / 2] =
                __floats2bfloat162_rn(dzv[j][2 * hr], dzv[j][2 * hr + 1]);
    } else {
      with_store(gz, [&](auto store) {
#pragma unroll
        for (int j = 0; j < kNTp; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = i0 + g + 8 * (e >> 1);
            if (owner && i < mr)
              store(gz0 + (i >> lr) * gz.stride[1] + grad_col<P>(cg, j, e, tq) * gz.stride[3],
                    dzv[j][e]);
          }
      });
    }
  }
  // dy to the workspace (fp32 pairs) and e dy as the bf16 operand (zero past the chunk).
  {
    const int64_t dy_row = static_cast<int64_t>(p.H) * R * P;  // workspace dy: token stride
    float* dyg = bp.ws.dy + (ck.l_abs0 * p.H + h) * static_cast<int64_t>(R * P);
    float* row[2];  // the fragment's two rows, each store an offset from them
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int i = i0 + g + 8 * hr;
      row[hr] = dyg + (i >> lr) * dy_row + (i & (R - 1)) * P + grad_col<P>(cg, 0, 0, tq);
    }
#pragma unroll
    for (int j = 0; j < kNTp; ++j)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int i = i0 + g + 8 * hr, x = grad_col<P>(cg, j, 0, tq);
        const float e0 = i < mr ? ex[i >> lr] : 0.f;
        if (i < mr)
          *reinterpret_cast<float2*>(row[hr] + grad_col_step<P>(j)) =
              make_float2(c[j][2 * hr], c[j][2 * hr + 1]);
        *reinterpret_cast<uint32_t*>(DYb + i * vp + x) =
            pack_bf16(e0 * c[j][2 * hr], e0 * c[j][2 * hr + 1]);
      }
  }
  dd = warp_sum(dd);
  if (lane == 0) red[kOutDd + warp] = dd;
  // The partial sums over the chunk, combined over the row tiles (and ranks for the norm weight)
  // in a fixed order.
  float* par = bp.ws.par + cell * bp.pf.count;
  float* cols = red + kOutFixed;
  rank_column_sums<P, kR>(szeta, cols, P, rt, cg, lane);
  __syncthreads();  // also: e dy complete
  for (int i = tid; i < R * P; i += kThreads)
    par[bp.pf.zeta + i] = cols[i] + cols[R * P + i] + cols[2 * R * P + i] + cols[3 * R * P + i];
  if (tid == 0) {
    float s = 0.f;
    for (int v = 0; v < kThreads / 32; ++v) s += red[kOutDd + v];
    par[bp.pf.d] = s;
  }
  __syncthreads();
  rank_column_sums<P, kR>(sphi, cols, P, rt, cg, lane);
  __syncthreads();
  for (int i = tid; i < R * P; i += kThreads)
    par[bp.pf.phi + i] = cols[i] + cols[R * P + i] + cols[2 * R * P + i] + cols[3 * R * P + i];
  __syncthreads();
  rank_column_sums<P, kR>(sw, cols, P, rt, cg, lane);
  __syncthreads();
  for (int x = tid; x < P; x += kThreads) {
    float s = 0.f;
    for (int k = 0; k < 4 * R; ++k) s += cols[k * P + x];
    par[bp.pf.w + x] = s;
  }
  // The state cotangent increment (e dY)^T Q (P, N).
  float* dsi = bp.ws.ds_end + cell * P * N;
  tc_gemm<true, true, 2>(
      P, N, DYb, vp, Q, qp, [kr](int, int, int* kb, int* ke) { *kb = 0, *ke = kr; },
      [&](int x, int n, float a0, float a1) {
        *reinterpret_cast<float2*>(dsi + static_cast<int64_t>(x) * N + n) = make_float2(a0, a1);
      },
      warp, lane);
}

// chunk_out_tc's instance for P in {64, 128} and R in {1, 2, 4, 8} (tensor_core_inputs), and
// whether y comes from the forward's saved buffer.
using OutTcKernel = void (*)(BwdParams, TcSmem);
template <int kP, bool kSavedY>
inline OutTcKernel out_tc_kernel_r(int R) {
  switch (R) {
    case 1:
      return bwd_chunk_out_tc_kernel<kP, 1, kSavedY>;
    case 2:
      return bwd_chunk_out_tc_kernel<kP, 2, kSavedY>;
    case 4:
      return bwd_chunk_out_tc_kernel<kP, 4, kSavedY>;
    default:
      return bwd_chunk_out_tc_kernel<kP, 8, kSavedY>;
  }
}
inline OutTcKernel out_tc_kernel(int P, int R, bool saved_y) {
  if (saved_y) return P == 64 ? out_tc_kernel_r<64, true>(R) : out_tc_kernel_r<128, true>(R);
  return P == 64 ? out_tc_kernel_r<64, false>(R) : out_tc_kernel_r<128, false>(R);
}

}  // namespace mamba3::cuda::bwd
