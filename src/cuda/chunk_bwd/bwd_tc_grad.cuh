// The tensor-core chunk_grad kernel: every gradient of a chunk from its tile record, the chunk's
// start state S_prev, the cotangent dS of its end state and dy (the math of
// bwd_chunk_grad_kernel in bwd_kernels.cuh), with the products' results kept in the mma
// accumulators instead of an fp32 staging tile.
//
// Warp tiling: 8 warps; warp w owns rows [16 (w >> 1), + 16) of each (64, X) product and half
// of its columns, two blocks of X / 4 columns X / 2 apart (grad_col0): products that share an
// output shape accumulate in the same registers (dV = fw (K dS^T) + (A o M)^T dY + D dy, dK =
// fw (V dS) + (dA o M)^T Q, dQ = e (dY S_prev) + (dA o M) K: the first product's rows are
// scaled in registers, then the k loop continues), and a rope pair is always inside one
// thread's fragment (interleaved pairs: columns 2 tq, 2 tq + 1 of an n-tile; halved pairs
// (a, a + N / 2): the same element of n-tiles j and j + X / 32), so the rotation adjoint runs on
// the accumulators. Sums over a token's R rows are shuffles across the fragment's row lanes
// (g = lane / 4; R divides 8), row sums shuffles across tq, column sums over the 16 rows of a
// warp shuffles across g; what crosses warps goes through shared memory and is combined in a
// fixed order by one thread per output. Deterministic; no atomics.
//
// The mask gradients need no (C, C) matrix: the score pass computes Q K^T and dY V^T for the
// same fragment, and its epilogue writes the masked bf16 operands A o M, dA o M and adds the
// per-element terms of d gamma, d w and d cs (T = sum over a token pair's R x R block of
// dA o raw) to row and column partials.
//
// Shared memory at N = 128, P = 64, R = 1, NA = 32: ~104 KB (q, k and the state operand 17 KB
// each, v, dy, A o M, dA o M 9 KB each, angles 8 KB, d theta in the space of A o M once the dV
// product is done, partial sums): two CTAs per SM.
#pragma once

#include "cuda/chunk_bwd/bwd_tc.cuh"

namespace mamba3::cuda::bwd {

// First column of 16-column group u (of X / 32) of column half cg of a (64, X) product.
template <int X>
__device__ __forceinline__ int grad_col0(int cg, int u) {
  constexpr int kG = X / 32;
  return (u < kG / 2 ? 0 : X / 2) + cg * (X / 4) + 16 * (u % (kG / 2));
}

// Column of element e of n-tile j of the fragment (lane's tq).
template <int X>
__device__ __forceinline__ int grad_col(int cg, int j, int e, int tq) {
  return grad_col0<X>(cg, j >> 1) + 8 * (j & 1) + 2 * tq + (e & 1);
}

// Column of n-tile j's first element relative to n-tile 0's: the same for every cg and tq, so a
// row pointer at grad_col(cg, 0, 0, tq) plus this reaches n-tile j of the fragment.
template <int X>
__device__ __forceinline__ int grad_col_step(int j) {
  return grad_col<X>(0, j, 0, 0) - grad_col<X>(0, 0, 0, 0);
}

// c += A (rows i0.., k in [kb, ke)) x B (k, the warp's X / 2 columns) on the tensor cores; A
// row-major [i][k] (kATrans: stored [k][i]), B stored [j][k] (kBKn: [k][j]); groups whose bit is
// clear in `live` are skipped. k tiles in increasing order.
template <int X, bool kATrans, bool kBKn>
__device__ __forceinline__ void grad_mma(float (&c)[X / 16][4], const bf16* A, int ap,
                                         const bf16* B, int bpitch, int i0, int cg, int kb, int ke,
                                         unsigned live, int lane) {
  constexpr int kG = X / 32;
  for (int k0 = kb; k0 < ke; k0 += 16)
    tc_kstep<kATrans, kBKn, kG>(
        c, A, ap, i0, B, bpitch, [cg](int u) { return grad_col0<X>(cg, u); }, k0, live, lane);
}

// The 16-column groups of a warp's (64, kRows) score fragment that the causal mask can leave
// non-zero (first column below the end of the warp's rows), none where its rows lie past the
// chunk: the `live` bits of grad_mma.
template <int kRows>
__device__ __forceinline__ unsigned grad_causal_groups(bool rows_live, int i0, int cg) {
  unsigned live = 0;
#pragma unroll
  for (int u = 0; u < kRows / 32; ++u)
    if (rows_live && grad_col0<kRows>(cg, u) < i0 + 16) live |= 1u << u;
  return live;
}

__host__ __device__ constexpr int log2_const(int x) { return x <= 1 ? 0 : 1 + log2_const(x / 2); }

// Sum of v over the kR rows of a token: the lanes whose g differ in the low log2(kR) bits.
template <int kR>
__device__ __forceinline__ float token_rows_sum(float v) {
#pragma unroll
  for (int s = 1; s < kR; s <<= 1) v += __shfl_xor_sync(0xffffffffu, v, 4 * s);
  return v;
}

// Sums of the first kCur of kV values per lane over the lanes whose g agree modulo kR (rows of
// the same rank), as a reduce-scatter over the lane bits kMask, 2 kMask, ... 16 (above the rank
// bits): at each bit the two partners each keep one half of the values and add the partner's
// copy of that half, so a lane ends with kCur >> levels sums; out(k, sum) gets them with k the
// index into the original values (off: the lane's offset so far). Fixed pairing: deterministic.
template <int kMask, int kCur, int kV, typename FO>
__device__ __forceinline__ void rank_rows_reduce_scatter(float (&v)[kV], int lane, int off,
                                                         FO& out) {
  if constexpr (kMask > 16) {
#pragma unroll
    for (int k = 0; k < kCur; ++k) out(k + off, v[k]);
  } else {
    static_assert(kCur >= 2, "rank_rows_reduce_scatter: too few values");
    constexpr int kHalf = kCur / 2;
    const bool upper = (lane & kMask) != 0;
#pragma unroll
    for (int k = 0; k < kHalf; ++k) {
      const float keep = upper ? v[k + kHalf] : v[k], send = upper ? v[k] : v[k + kHalf];
      v[k] = keep + __shfl_xor_sync(0xffffffffu, send, kMask);
    }
    rank_rows_reduce_scatter<2 * kMask, kHalf>(v, lane, upper ? off + kHalf : off, out);
  }
}

// Row sums over the warp's X / 2 columns of a (64, X) fragment times the bf16 tile T (pitch tp),
// added across tq and written by lanes tq == 0 to slot[cg * 64 + row] (the two column halves
// are combined later).
template <int X>
__device__ __forceinline__ void grad_row_dots(const float (&c)[X / 16][4], const bf16* T, int tp,
                                              float* slot, int i0, int cg, int lane) {
  const int g = lane >> 2, tq = lane & 3;
  float xs[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < X / 16; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = i0 + g + 8 * (e >> 1);
      xs[e >> 1] += c[j][e] * __bfloat162float(T[i * tp + grad_col<X>(cg, j, e, tq)]);
    }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float x = xs[hr];
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    if (tq == 0) slot[cg * 64 + i0 + g + 8 * hr] = x;
  }
}

// Scales the fragment's rows g and g + 8 by f0 and f1.
template <int X>
__device__ __forceinline__ void grad_scale_rows(float (&c)[X / 16][4], float f0, float f1) {
#pragma unroll
  for (int j = 0; j < X / 16; ++j) c[j][0] *= f0, c[j][1] *= f0, c[j][2] *= f1, c[j][3] *= f1;
}

// The rotation adjoint on a (64, N) fragment of q or k gradient rows: each pair with a < NA of a
// valid row is rotated back by its token's angle (TH), and the token's d theta term, summed over
// its R rows, goes to out(t, a, value) from one lane. X: the rotated bf16 rows (q or k).
template <int N, int kR, typename FO>
__device__ __forceinline__ void grad_rope_adjoint(float (&c)[N / 16][4], const bf16* X, int xp,
                                                  const float* TH, int NA, bool interleaved,
                                                  int i0, int cg, int lane, int mr, FO out) {
  constexpr int kNT = N / 16, kG = N / 32, R = kR, lr = log2_const(kR);
  const int g = lane >> 2, tq = lane & 3;
  auto rotate = [&](float& da, float& db, int i, int ia, int ib, int a, float* d) {
    float sn, cn;
    __sincosf(TH[(i >> lr) * NA + a], &sn, &cn);
    *d = -da * __bfloat162float(X[i * xp + ib]) + db * __bfloat162float(X[i * xp + ia]);
    const float na = da * cn + db * sn, nb = -da * sn + db * cn;
    da = na, db = nb;
  };
  if (interleaved) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      if (grad_col<N>(cg, j, 0, 0) / 2 >= NA) continue;  // warp-uniform
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int i = i0 + g + 8 * hr, ia = grad_col<N>(cg, j, 0, tq), a = ia >> 1;
        const bool ok = a < NA && i < mr;
        float d = 0.f;
        if (ok) rotate(c[j][2 * hr], c[j][2 * hr + 1], i, ia, ia + 1, a, &d);
        d = token_rows_sum<kR>(d);
        if (ok && (g & (R - 1)) == 0) out(i >> lr, a, d);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < kNT / 2; ++j) {  // block 0 holds a = ia; its partner is n-tile j + kG
      if (grad_col<N>(cg, j, 0, 0) >= NA) continue;  // warp-uniform
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + g + 8 * (e >> 1), ia = grad_col<N>(cg, j, e, tq);
        const bool ok = ia < NA && i < mr;
        float d = 0.f;
        if (ok) rotate(c[j][e], c[j + kG][e], i, ia, ia + N / 2, ia, &d);
        d = token_rows_sum<kR>(d);
        if (ok && (g & (R - 1)) == 0) out(i >> lr, ia, d);
      }
    }
  }
}

// Whether a gradient takes bf16 pairs: bf16, unit column stride, and every row start (base plus
// multiples of the token and rank strides) at an even element, so that columns 2 tq, 2 tq + 1
// form one aligned 4-byte store.
__device__ __forceinline__ bool bf16_pairs(const DTensor& t, int64_t base, int64_t s_a,
                                           int64_t s_b) {
  return t.dtype == DType::kBF16 && t.stride[t.ndim - 1] == 1 && ((base | s_a | s_b) & 1) == 0 &&
         (reinterpret_cast<uintptr_t>(t.data) & 3) == 0;
}

// Stores the unrotated q or k gradient rows of a fragment as store_qk_grad does: to the per-head
// workspace when the head shares its group, else to the gradient.
template <int N, int kR>
__device__ __forceinline__ void grad_store_qk(const BwdParams& bp, const Chunk& ck,
                                              const float (&c)[N / 16][4], const DTensor& grad,
                                              float* ws, int i0, int cg, int lane) {
  const CoreParams& p = bp.p;
  constexpr int kNT = N / 16, R = kR, lr = log2_const(kR);
  const int g = lane >> 2, tq = lane & 3, mr = ck.mr;
  if (ws) {
    // The fragment's two rows as pointers, each store an offset from them (the address math
    // per element, in 64 bits, was ~15 instructions a store: 9 % of the kernel's at `train`).
    const int64_t t_stride = static_cast<int64_t>(p.H) * R * N;
    float* base = ws + (ck.l_abs0 * p.H + ck.h) * static_cast<int64_t>(R * N);
    float* row[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int i = i0 + g + 8 * hr;
      row[hr] = base + (i >> lr) * t_stride + (i & (R - 1)) * N + grad_col<N>(cg, 0, 0, tq);
    }
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
        if (i0 + g + 8 * hr < mr)
          *reinterpret_cast<float2*>(row[hr] + grad_col_step<N>(j)) =
              make_float2(c[j][2 * hr], c[j][2 * hr + 1]);
  } else if (grad.defined()) {
    const int64_t base = qk_off(grad, ck.b, ck.begin + ck.t0, 0, ck.g, 0);
    const int64_t s_t = grad.stride[1], s_r = grad.ndim == 4 ? 0 : grad.stride[2];
    const int64_t s_n = grad.stride[grad.ndim - 1];
    if (bf16_pairs(grad, base, s_t, s_r)) {
      __nv_bfloat162* d = static_cast<__nv_bfloat162*>(grad.data);
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int i = i0 + g + 8 * hr;
          if (i < mr)
            d[(base + (i >> lr) * s_t + (i & (R - 1)) * s_r + grad_col<N>(cg, j, 0, tq)) / 2] =
                __floats2bfloat162_rn(c[j][2 * hr], c[j][2 * hr + 1]);
        }
      return;
    }
    with_store(grad, [&](auto store) {
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = i0 + g + 8 * (e >> 1);
          if (i < mr)
            store(base + (i >> lr) * s_t + (i & (R - 1)) * s_r + grad_col<N>(cg, j, e, tq) * s_n,
                  c[j][e]);
        }
    });
  }
}

// v[] (2 (X / 16) values per lane: the fragment's columns, rows g and g + 8 already added)
// summed over the warp's 16 rows by rank and written as dst[(rt kR + r) ld + column] for the 4
// row tiles rt to combine (rank_rows_reduce_scatter).
template <int X, int kR>
__device__ __forceinline__ void rank_column_sums(float (&v)[X / 8], float* dst, int ld, int rt,
                                                 int cg, int lane) {
  const int tq = lane & 3, r = (lane >> 2) & (kR - 1);
  auto out = [&](int k, float sum) {
    dst[(rt * kR + r) * ld + grad_col<X>(cg, k >> 1, k & 1, tq)] = sum;
  };
  rank_rows_reduce_scatter<4 * kR, X / 8>(v, lane, 0, out);
}

// Column sums of a (64, X) fragment over the warp's 16 rows by rank (rows past the chunk hold
// zero), written as rank_column_sums does.
template <int X, int kR>
__device__ __forceinline__ void grad_rank_column_sums(const float (&c)[X / 16][4], float* dst,
                                                      int ld, int rt, int cg, int lane) {
  float v[X / 8];
#pragma unroll
  for (int j = 0; j < X / 16; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) v[2 * j + e] = c[j][e] + c[j][e + 2];
  rank_column_sums<X, kR>(v, dst, ld, rt, cg, lane);
}

// grid (chunks, H), kThreads: see the top of this file.
// Two CTAs per SM (128 registers) at P = 64. At P = 128 (32-float dV accumulators) 128 registers
// sat on the edge: N = 64 spilled at R >= 4, and at R = 2 in one build of the same source but
// not in another (ptxas, 2026-11-29); N = P = 128 fits one CTA per SM by shared memory anyway.
// So P = 128 asks for one CTA per SM, and the registers it needs.
__host__ __device__ constexpr int grad_tc_min_blocks(int P) { return P == 128 ? 1 : 2; }

template <int kN, int kP, int kR>
__global__ void __launch_bounds__(kThreads, grad_tc_min_blocks(kP))
    bwd_chunk_grad_tc_kernel(BwdParams bp, TcSmem lay) {
  M3B_DYNAMIC_SMEM_TC(sm);
  Chunk ck0;
  if (!find_chunk(bp, blockIdx.x, blockIdx.y, &ck0)) return;
  const CoreParams& p = bp.p;
  constexpr int kT = kThreads, N = kN, P = kP, kRows = kMaxRows;
  constexpr int R = kR, lr = log2_const(kR);  // p.R
  const int64_t cell = static_cast<int64_t>(ck0.cid) * p.H + ck0.h;
  const float* sprev = bp.ws.s_prev + cell * P * N;
  const float* dsend = bp.ws.ds_end + cell * P * N;
  const int64_t dy_row = static_cast<int64_t>(p.H) * R * P;  // workspace dy: token stride
  const float* dyg = bp.ws.dy + (ck0.l_abs0 * p.H + ck0.h) * static_cast<int64_t>(R * P);
  // The fp32 rows read after the record, asked of the L2 now (ncu: the packs of the dy and dS_end
  // staging waited on their loads, ~8 % of the stall samples at `train`): dS_end, S_prev (read
  // late, for dQ) and the chunk's dy rows. MIMO only: same run on the H200 (2026-11-30), the
  // backward at `megacpp` (R = 4) 1.2 % faster with them, at `train` and `long` (R = 1) 0.8 and
  // 3 % slower.
  if constexpr (kR > 1) {
    if (threadIdx.x == 0) prefetch_l2(dsend, P * N * 4);
    if (threadIdx.x == 32) prefetch_l2(sprev, P * N * 4);
    const int t = static_cast<int>(threadIdx.x) - 64;
    if (t >= 0 && t < ck0.m) prefetch_l2(dyg + t * dy_row, R * P * 4);
  }
  float* red = reinterpret_cast<float*>(sm + lay.red);
  // The chunk as read back from shared memory after the first barrier: its fields are needed
  // again only by the stores of the last phases (128 registers leave no room to keep them).
  static_assert(sizeof(Chunk) <= 4 * (kRedFixed - kRedChunk), "Chunk slot of lay.red");
  if (threadIdx.x == 0) *reinterpret_cast<Chunk*>(red + kRedChunk) = ck0;
  const Chunk& ck = *reinterpret_cast<const Chunk*>(red + kRedChunk);
  constexpr int kNTn = N / 16, kNTp = P / 16, kNTs = kRows / 16;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tq = lane & 3, cg = warp & 1, rt = warp >> 1, i0 = 16 * rt;
  const int NA = p.NA, m = ck0.m, mr = ck0.mr, h = ck0.h;
  const int kr = (mr + 15) & ~15;  // rows rounded up to whole 16-row tiles (zero past mr)
  const bool rows_live = i0 < kr;
  float* psi = reinterpret_cast<float*>(sm + lay.par);
  tc_chunk_tiles<true>(bp, ck0, lay, sm, tid);  // the loader's output (chunk_state_tc or forward)
  load_head_psi(p, h, psi, tid, kT);  // dv = sum_r dV_r psi_r
  float* sc = reinterpret_cast<float*>(sm + lay.scal);
  const float* cs = sc + kCs * kMaxRows;
  const float* ex = sc + kE * kMaxRows;
  const float* w = sc + kW * kMaxRows;
  const float* fw = sc + kFw * kMaxRows;
  const float* gam = sc + kGam * kMaxRows;
  float* dcs = sc + kDcs * kMaxRows;
  float* dwt = sc + kDw * kMaxRows;
  float* dgam = sc + kDgam * kMaxRows;
  float* fwx = sc + kXr * kMaxRows;  // fw_t x_t
  const bf16* Q = reinterpret_cast<const bf16*>(sm + lay.q);
  const bf16* K = reinterpret_cast<const bf16*>(sm + lay.k);
  const bf16* V = reinterpret_cast<const bf16*>(sm + lay.v);
  bf16* DYb = reinterpret_cast<bf16*>(sm + lay.dy);
  bf16* Sb = reinterpret_cast<bf16*>(sm + lay.s);
  bf16* AM = reinterpret_cast<bf16*>(sm + lay.am);
  bf16* DAM = AM + lay.rows * lay.ap;
  const float* TH = reinterpret_cast<const float*>(sm + lay.th);
  float* DTH = reinterpret_cast<float*>(sm + lay.dth);  // may share A o M's space (after dV)
  const bool psi_sums = bp.g_psi.defined();
  float* red_psi = red + kRedFixed;
  float* red_bias = red_psi + (psi_sums ? 4 * R * P : 0);
  const int qp = lay.qp, vp = lay.vp, ap = lay.ap;
  const bool has_d = p.d.defined();
  const float dskip = has_d ? dload_ro(p.d, h * p.d.stride[0]) : 0.f;
  float* par = bp.ws.par + cell * bp.pf.count;
  auto dy_at = [&](int row, int x) -> const float& {
    return dyg[(row >> lr) * dy_row + (row & (R - 1)) * P + x];
  };
  // Rows g and g + 8 of the warp's tile: their tokens' factors, zero past the chunk.
  const int row0 = i0 + g, row1 = i0 + g + 8;
  const bool split_states = R > 1;  // see the dK phase

  {  // dy rows (fp32 workspace) -> bf16 tile, 4 columns at a time; zero past the chunk. All
     // loads first (see stage_state_bf16).
    constexpr int p4 = P / 4, lp4 = p4 == 16 ? 4 : 5, kIt = kRows * p4 / kT;
    static_assert(kRows * p4 % kT == 0, "whole passes");
    float4 v[kIt];
#pragma unroll
    for (int u = 0; u < kIt; ++u) {
      const int i = tid + u * kT, row = i >> lp4, x = (i & (p4 - 1)) * 4;
      v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row < mr)
        v[u] = *reinterpret_cast<const float4*>(dyg + (row >> lr) * dy_row + (row & (R - 1)) * P + x);
    }
#pragma unroll
    for (int u = 0; u < kIt; ++u) {
      const int i = tid + u * kT, row = i >> lp4, x = (i & (p4 - 1)) * 4;
      uint2 pk;
      pk.x = pack_bf16(v[u].x, v[u].y);
      pk.y = pack_bf16(v[u].z, v[u].w);
      *reinterpret_cast<uint2*>(DYb + row * vp + x) = pk;
    }
  }
  stage_state_bf16(dsend, Sb, P, N, qp, tid);
  cp_async_wait_all();
  __syncthreads();
  if (tc_v_rows_need_psi(bp)) {  // v psi of a record without the PsiV cache
    tc_scale_v_rows(bp, lay, sm, psi, ck0.mr, tid);
    __syncthreads();
  }

  // Scores: raw = Q K^T and dA = dY V^T (fp32, causal 16-column groups only), then A o M and
  // dA o M (bf16, zero above the diagonal and past the chunk; every element has one owner) and
  // the terms of d cs (row sums of T o coef), d w (column sums of T o exp(cs_i - cs_j)) and
  // d gamma (T on the diagonal).
  {
    float ra[kNTs][4] = {}, da[kNTs][4] = {};
    const unsigned live = grad_causal_groups<kRows>(rows_live, i0, cg);
    grad_mma<kRows, false, false>(ra, Q, qp, K, qp, i0, cg, 0, N, live, lane);
    grad_mma<kRows, false, false>(da, DYb, vp, V, vp, i0, cg, 0, P, live, lane);
    float rowa[2] = {0.f, 0.f}, diag[2] = {0.f, 0.f}, colb[kNTs][2] = {};
#pragma unroll
    for (int j = 0; j < kNTs; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + g + 8 * (e >> 1), col = grad_col<kRows>(cg, j, e, tq);
        const int ti = i >> lr, tj = col >> lr;
        float a = 0.f, d = 0.f;
        if (i < mr && col < mr && tj <= ti) {
          const float rv = ra[j][e], dv = da[j][e], prod = dv * rv;
          if (tj < ti) {
            const float ez = chunk_decay<true>(cs, ti, tj), coef = ez * w[tj];
            a = rv * coef, d = dv * coef;
            rowa[e >> 1] += prod * coef;
            colb[j][e & 1] += prod * ez;
          } else {
            a = rv * gam[ti], d = dv * gam[ti];
            diag[e >> 1] += prod;
          }
        }
        AM[i * ap + col] = __float2bfloat16_rn(a);
        DAM[i * ap + col] = __float2bfloat16_rn(d);
      }
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float a = rowa[hr], d = diag[hr];
      a += __shfl_xor_sync(0xffffffffu, a, 1);
      a += __shfl_xor_sync(0xffffffffu, a, 2);
      d += __shfl_xor_sync(0xffffffffu, d, 1);
      d += __shfl_xor_sync(0xffffffffu, d, 2);
      if (tq == 0) {
        red[kRedRowA + cg * 64 + i0 + g + 8 * hr] = a;
        red[kRedDiag + cg * 64 + i0 + g + 8 * hr] = d;
      }
    }
#pragma unroll
    for (int j = 0; j < kNTs; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = colb[j][e];
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        if (g == 0) red[kRedColB + rt * 64 + grad_col<kRows>(cg, j, e, tq)] = v;
      }
  }
  __syncthreads();
  if (tid < m) {  // d gamma, d w and the mask's part of d cs per token
    float dg = 0.f, dwv = 0.f, dc = 0.f;
    for (int r = 0; r < R; ++r) {
      const int i = tid * R + r;
      dg += red[kRedDiag + i] + red[kRedDiag + 64 + i];
      dc += red[kRedRowA + i] + red[kRedRowA + 64 + i];
      dwv += red[kRedColB + i] + red[kRedColB + 64 + i] + red[kRedColB + 128 + i] +
             red[kRedColB + 192 + i];
    }
    dgam[tid] = dg;
    dwt[tid] = dwv;
    dcs[tid] = dc - w[tid] * dwv;
  }

  // dV = fw (K dS^T) + (A o M)^T dY + D dy (key rows k >= i for the intra part); on the way the
  // row sums x = sum v o (K dS^T) for d cs and d w. Then dv = sum_r dV_r psi_r and the d psi
  // partial sum_t dV o v.
  {
    float c[kNTp][4] = {};
    const unsigned all = (1u << (P / 32)) - 1;
    grad_mma<P, false, false>(c, K, qp, Sb, qp, i0, cg, 0, rows_live ? N : 0, all, lane);
    grad_row_dots<P>(c, V, vp, red + kRedX, i0, cg, lane);
    grad_scale_rows<P>(c, row0 < mr ? fw[row0 >> lr] : 0.f, row1 < mr ? fw[row1 >> lr] : 0.f);
    grad_mma<P, true, true>(c, AM, ap, DYb, vp, i0, cg, i0, kr, all, lane);
    if (has_d) {            // dy of columns 2 tq, 2 tq + 1 as one float2 (the row offsets are even)
      const float* row[2];  // the fragment's two rows, each load an offset from them
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) row[hr] = &dy_at(i0 + g + 8 * hr, grad_col<P>(cg, 0, 0, tq));
#pragma unroll
      for (int j = 0; j < kNTp; ++j)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          if (i0 + g + 8 * hr < mr) {
            const float2 d2 = *reinterpret_cast<const float2*>(row[hr] + grad_col_step<P>(j));
            c[j][2 * hr] += dskip * d2.x;
            c[j][2 * hr + 1] += dskip * d2.y;
          }
        }
    }
    const DTensor& gv = bp.g_v;
    if (gv.defined()) {
      const bool dfv = ck.last && bp.df_v.defined();
      const int64_t vrow0 = ck.b * gv.stride[0] +
                            static_cast<int64_t>(ck.begin + ck.t0) * gv.stride[1] + h * gv.stride[2];
      // dv of column x of row i's token (valid on the lanes with g % R == 0).
      auto dv_of = [&](float dvr, int i, int x) {
        float v = token_rows_sum<kR>(dvr * psi[(i & (R - 1)) * P + x]);
        if (dfv && (i >> lr) == m - 1) v += dload(bp.df_v, shx_off(bp.df_v, ck.s, h, x));
        return v;
      };
      if (bf16_pairs(gv, vrow0, gv.stride[1], 0)) {
        // The fragment's two rows as pointers (every offset even: exact halves), each store an
        // offset from them, as grad_store_qk.
        __nv_bfloat162* row[2];
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
          row[hr] =
              static_cast<__nv_bfloat162*>(gv.data) +
              (vrow0 + ((i0 + g + 8 * hr) >> lr) * gv.stride[1] + grad_col<P>(cg, 0, 0, tq)) / 2;
#pragma unroll
        for (int j = 0; j < kNTp; ++j)
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int i = i0 + g + 8 * hr, x = grad_col<P>(cg, j, 0, tq);
            const float v0 = dv_of(c[j][2 * hr], i, x), v1 = dv_of(c[j][2 * hr + 1], i, x + 1);
            if (i < mr && (g & (R - 1)) == 0)
              row[hr][grad_col_step<P>(j) / 2] = __floats2bfloat162_rn(v0, v1);
          }
      } else {
        with_store(gv, [&](auto store) {
#pragma unroll
          for (int j = 0; j < kNTp; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = i0 + g + 8 * (e >> 1), x = grad_col<P>(cg, j, e, tq);
              const float v = dv_of(c[j][e], i, x);
              if (i < mr && (g & (R - 1)) == 0)
                store(vrow0 + (i >> lr) * gv.stride[1] + x * gv.stride[3], v);
            }
        });
      }
    }
    if (psi_sums) {  // sum over tokens of dV_r o v (raw bf16 v, read from global)
      const DTensor& vt = p.v;
      const unsigned short* v0 = static_cast<const unsigned short*>(vt.data) + ck.b * vt.stride[0] +
                                 static_cast<int64_t>(ck.begin + ck.t0) * vt.stride[1] +
                                 h * vt.stride[2];
      const unsigned short* vrow[2];  // the fragment's two rows, each load an offset from them
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
        vrow[hr] = v0 + ((i0 + g + 8 * hr) >> lr) * vt.stride[1] + grad_col<P>(cg, 0, 0, tq);
#pragma unroll
      for (int j = 0; j < kNTp; ++j)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {  // columns 2 tq, 2 tq + 1 as one bf16 pair (tc_vec rows)
          const int i = i0 + g + 8 * hr;
          const unsigned int u =
              i < mr ? __ldg(reinterpret_cast<const unsigned int*>(vrow[hr] + grad_col_step<P>(j)))
                     : 0u;
          c[j][2 * hr] = i < mr ? c[j][2 * hr] * __uint_as_float(u << 16) : 0.f;
          c[j][2 * hr + 1] = i < mr ? c[j][2 * hr + 1] * __uint_as_float(u & 0xffff0000u) : 0.f;
        }
      grad_rank_column_sums<P, kR>(c, red_psi, P, rt, cg, lane);
    }
  }
  __syncthreads();
  if (tid < m) {  // the decay term of each key token; its sum goes to d cs_last below
    const int t = tid;
    float xt = 0.f;
    for (int r = 0; r < R; ++r) xt += red[kRedX + t * R + r] + red[kRedX + 64 + t * R + r];
    dwt[t] += expf(cs[m - 1] - cs[t]) * xt;
    dcs[t] -= fw[t] * xt;
    fwx[t] = fw[t] * xt;
  }
  if (psi_sums)
    for (int i = tid; i < R * P; i += kT)
      par[bp.pf.psi + i] = red_psi[i] + red_psi[R * P + i] + red_psi[2 * R * P + i] +
                           red_psi[3 * R * P + i];

  // dK = fw (V dS) + (dA o M)^T Q (key rows k >= i) (+ d final k), then the rotation adjoint.
  // For MIMO V dS takes dS as two bf16 terms (hi, then lo in the same tile), and so does
  // dY S_prev below: these products carry the cross-chunk pairs into the rotation gradients,
  // whose other side went through the fp32 state scans; with one bf16 term the mismatch left
  // 5.1e-3 on grad.angles (emulated, R = 4, L = 512), with two 3.7e-3. MIMO only: its
  // 64 / R-token chunks make most interacting pairs cross a chunk boundary (SISO: 4.1e-3 on
  // the H200 without either fix).
  const unsigned all_n = (1u << (N / 32)) - 1;
  {
    float c[kNTn][4] = {};
    grad_mma<N, false, true>(c, V, vp, Sb, qp, i0, cg, 0, rows_live ? P : 0, all_n, lane);
    if (split_states) {
      __syncthreads();
      stage_state_bf16<true>(dsend, Sb, P, N, qp, tid);
      __syncthreads();
      grad_mma<N, false, true>(c, V, vp, Sb, qp, i0, cg, 0, rows_live ? P : 0, all_n, lane);
    }
    grad_scale_rows<N>(c, row0 < mr ? fw[row0 >> lr] : 0.f, row1 < mr ? fw[row1 >> lr] : 0.f);
    grad_mma<N, true, true>(c, DAM, ap, Q, qp, i0, cg, i0, kr, all_n, lane);
    if (ck.last && bp.df_k.defined())
#pragma unroll
      for (int j = 0; j < kNTn; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = i0 + g + 8 * (e >> 1);
          if (i < mr && (i >> lr) == m - 1)
            c[j][e] += dload(bp.df_k, sk_off(bp.df_k, ck.s, i & (R - 1), h, grad_col<N>(cg, j, e, tq)));
        }
    grad_rope_adjoint<N, kR>(c, K, qp, TH, NA, p.interleaved, i0, cg, lane, mr,
                             [&](int t, int a, float v) { DTH[t * NA + a] = v; });
    grad_store_qk<N, kR>(bp, ck, c, bp.g_k, bp.ws.dk, i0, cg, lane);
    grad_rank_column_sums<N, kR>(c, red_bias, N, rt, cg, lane);
  }
  __syncthreads();
  {  // S_prev as the operand; on the way the sum of dS o S_prev (fp32) for d cs_last.
    float dsum = 0.f;
    constexpr int n4 = N / 4, ln4 = log2_const(n4), kTotal = P * n4;
    static_assert(kTotal % (4 * kT) == 0, "whole batches");
    for (int i0 = tid; i0 < kTotal; i0 += 4 * kT) {  // 4 iterations' loads first (stage_state_bf16)
      float4 v[4], d[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u * kT, x = i >> ln4, n = (i & (n4 - 1)) * 4;
        v[u] = *reinterpret_cast<const float4*>(sprev + static_cast<int64_t>(x) * N + n);
        d[u] = *reinterpret_cast<const float4*>(dsend + static_cast<int64_t>(x) * N + n);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = i0 + u * kT, x = i >> ln4, n = (i & (n4 - 1)) * 4;
        dsum += d[u].x * v[u].x + d[u].y * v[u].y + d[u].z * v[u].z + d[u].w * v[u].w;
        uint2 pk;
        pk.x = pack_bf16(v[u].x, v[u].y);
        pk.y = pack_bf16(v[u].z, v[u].w);
        *reinterpret_cast<uint2*>(Sb + x * qp + n) = pk;
      }
    }
    dsum = warp_sum(dsum);
    if (lane == 0) red[kRedDs + warp] = dsum;
  }
  __syncthreads();
  for (int i = tid; i < R * N; i += kT)
    par[bp.pf.kb + i] = red_bias[i] + red_bias[R * N + i] + red_bias[2 * R * N + i] +
                        red_bias[3 * R * N + i];
  if (tid == 0) {  // d cs_last: the decay terms of dV and exp(cs_last) sum dS o S_prev
    float last = 0.f, ds = 0.f;
    for (int t = 0; t < ck.m; ++t) last += fwx[t];
    for (int v = 0; v < kT / 32; ++v) ds += red[kRedDs + v];
    dcs[ck.m - 1] += last + ex[ck.m - 1] * ds;
  }

  // dQ = e (dY S_prev) + (dA o M) K (key rows k <= i), then the rotation adjoint; on the way
  // the row sums of (dY S_prev) o Q for d cs.
  float c[kNTn][4] = {};  // dQ; its bias partials are written after the next barrier
  {
    grad_mma<N, false, true>(c, DYb, vp, Sb, qp, i0, cg, 0, rows_live ? P : 0, all_n, lane);
    if (split_states) {
      __syncthreads();
      stage_state_bf16<true>(sprev, Sb, P, N, qp, tid);
      __syncthreads();
      grad_mma<N, false, true>(c, DYb, vp, Sb, qp, i0, cg, 0, rows_live ? P : 0, all_n, lane);
    }
    grad_row_dots<N>(c, Q, qp, red + kRedX2, i0, cg, lane);
    grad_scale_rows<N>(c, row0 < mr ? ex[row0 >> lr] : 0.f, row1 < mr ? ex[row1 >> lr] : 0.f);
    grad_mma<N, false, true>(c, DAM, ap, K, qp, i0, cg, 0, rows_live ? imin(i0 + 16, kr) : 0,
                             all_n, lane);
    grad_rope_adjoint<N, kR>(c, Q, qp, TH, NA, p.interleaved, i0, cg, lane, mr,
                             [&](int t, int a, float v) { DTH[t * NA + a] += v; });
    grad_store_qk<N, kR>(bp, ck, c, bp.g_q, bp.ws.dq, i0, cg, lane);
  }
  __syncthreads();
  if (tid < ck.m) {
    float acc = 0.f;
    for (int r = 0; r < R; ++r) acc += red[kRedX2 + tid * R + r] + red[kRedX2 + 64 + tid * R + r];
    dcs[tid] += ex[tid] * acc;
  }
  grad_rank_column_sums<N, kR>(c, red_bias, N, rt, cg, lane);
  __syncthreads();
  for (int i = tid; i < R * N; i += kT)
    par[bp.pf.qb + i] = red_bias[i] + red_bias[R * N + i] + red_bias[2 * R * N + i] +
                        red_bias[3 * R * N + i];
  // The k tile as scratch: its last reads were before the barrier above.
  chunk_token_outputs(bp, ck, dcs, dgam, dwt, DTH, reinterpret_cast<float*>(sm + lay.k), tid);
}

}  // namespace mamba3::cuda::bwd
