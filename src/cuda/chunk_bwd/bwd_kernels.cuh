// Kernels of the chunked backward, in launch order (DESIGN.md §2.3, §2.5; the math is the cpu
// lane's backward_task in src/cpu/chunked.cpp, spread over chunks):
//   plan         chunk ids of every sequence
//   angle_sum    per chunk: sum of the angle increments (float64)
//   angle_scan   per (sequence, head): chunk-start angles
//   chunk_state  per chunk: the chunk's state increment sum_j fw_j v_j k_j^T and its decay
//   state_scan   per (sequence, head): chunk-start states (in place over the increments)
//   chunk_out    per chunk: y recomputed, the output stage's adjoint -> dy, dz, parameter
//                partials, and the chunk's dS increment sum_i e_i dy_i q_i^T
//   dstate_scan  per (sequence, head): state cotangent at every chunk end, and at the start
//   chunk_grad   per chunk: dq, dk, dv, d cs / d gamma / d w, rotation gradients, partials
//   angle_boundary per chunk: rotation derivative at the chunk's end from the fp32 states
//   dtheta_scan  per (sequence, head): angle cotangent carried into every chunk end
//   init_grads   per (sequence, head): gradients of the initial k, v and the initial pair
//   token_grads  per chunk: adt / dt / trap / angles gradients
//   reduce_qk    q, k gradients summed over the heads of a group (fixed order)
//   reduce_par   parameter gradients summed over chunks and sequences (fixed order)
// Chunk kernels run on a (chunk upper bound, H) grid; (sequence, head) kernels on S * H blocks.
// chunk_state, chunk_out and chunk_grad have tensor-core versions in bwd_tc.cuh (bf16 q, k, v
// at N, P in {64, 128}); the SIMT versions here serve everything else.
//
// Measured (H200, 2026-11-29, `mamba3 bench --lane cuda --shape train --dtype bf16 --what bwd`,
// per-kernel times from ncu gpu__time_duration): 56.9 ms per backward, of which chunk_grad
// 29.0 ms, chunk_out 18.2 ms, chunk_state 4.0 ms, the two state scans 1.5 ms, the rest < 1 ms.
// The chunk kernels hold ~200 KB of shared memory (one CTA, 8 warps per SM) and their fp32 SIMT
// products reach ~10 % of the FMA peak (this measurement predates bwd_tc.cuh).
#pragma once

#include <cstdio>
#include <cstdlib>

#include "cuda/chunk_bwd/bwd_params.cuh"

namespace mamba3::cuda::bwd {

#ifdef MAMBA3_CUDA_EMU
#define M3B_DYNAMIC_SMEM(name) float* name = ::m3emu::dynamic_smem()
#else
#define M3B_DYNAMIC_SMEM(name) extern __shared__ __align__(16) float name[]
#endif

__global__ void __launch_bounds__(32) bwd_plan_kernel(BwdParams bp) {
  if (threadIdx.x != 0) return;
  if (bp.saved_hdr) {  // the saved buffer must come from a forward on inputs of these shapes
    for (int i = 0; i < kSavedHeaderInts; ++i)
      if (bp.saved_hdr[i] != bp.want_hdr[i]) {
        printf("mamba3 cuda backward: BackwardArgs::saved header word %d is %d, these inputs "
               "expect %d (not the saved buffer of a forward on them); aborting the kernel\n",
               i, bp.saved_hdr[i], bp.want_hdr[i]);
#ifdef MAMBA3_CUDA_EMU
        std::abort();
#else
        __trap();
#endif
      }
  }
  int off = 0;
  for (int s = 0; s < bp.p.S; ++s) {
    bp.ws.chunk_off[s] = off;
    off += (seq_info(bp.p, s).n + bp.C - 1) / bp.C;
  }
  bp.ws.chunk_off[bp.p.S] = off;
}

// grid (chunks, H): the chunk's angles and dt staged in shared memory (C * NA + kMaxRows
// floats), then one thread per rope angle sums its increments in float64.
__global__ void __launch_bounds__(kThreads, 1) bwd_angle_sum_kernel(BwdParams bp) {
  M3B_DYNAMIC_SMEM(sm);
  Chunk ck;
  if (!find_chunk(bp, blockIdx.x, blockIdx.y, &ck)) return;
  const CoreParams& p = bp.p;
  const int tid = threadIdx.x, NA = p.NA, m = ck.m, l0 = ck.begin + ck.t0;
  float* dtv = sm;
  float* ang = sm + kMaxRows;
  if (tid < m) dtv[tid] = in_bhl(p.dt, ck.b, ck.h, l0 + tid);
#pragma unroll 8
  for (int i = tid; i < m * NA; i += kThreads) ang[i] = angle_at(p, ck.b, l0 + i / NA, ck.h, i % NA);
  __syncthreads();
  if (tid >= NA) return;
  double acc = 0.0;
  for (int t = 0; t < m; ++t) acc += angle_inc(ang[t * NA + tid], dtv[t]);
  bp.ws.theta[(static_cast<int64_t>(ck.cid) * p.H + ck.h) * NA + tid] = acc;
}

// grid S * H, 64 threads: theta at each chunk start = theta0 + earlier increments.
__global__ void __launch_bounds__(64) bwd_angle_scan_kernel(BwdParams bp) {
  const CoreParams& p = bp.p;
  const int s = blockIdx.x / p.H, h = blockIdx.x % p.H, i = threadIdx.x;
  if (i >= p.NA) return;
  double th =
      p.init_angle.defined() ? dload_f64(p.init_angle, shx_off(p.init_angle, s, h, i)) : 0.0;
  const int c0 = bp.ws.chunk_off[s], c1 = bp.ws.chunk_off[s + 1];
  auto slot = [&](int c) { return bp.ws.theta + (static_cast<int64_t>(c) * p.H + h) * p.NA + i; };
  for (int cb = c0; cb < c1; cb += kScanBatch) {  // the loads of a batch in flight together
    double inc[kScanBatch];
#pragma unroll
    for (int u = 0; u < kScanBatch; ++u)
      if (cb + u < c1) inc[u] = *slot(cb + u);
#pragma unroll
    for (int u = 0; u < kScanBatch; ++u)
      if (cb + u < c1) {
        *slot(cb + u) = th;
        th += inc[u];
      }
  }
}

// grid (chunks, H): the chunk's state increment sum_j fw_j (v_j psi) k_j^T (P, N) and decay.
__global__ void __launch_bounds__(kThreads, 1) bwd_chunk_state_kernel(BwdParams bp, BwdSmem lay) {
  M3B_DYNAMIC_SMEM(sm);
  Chunk ck;
  if (!find_chunk(bp, blockIdx.x, blockIdx.y, &ck)) return;
  const CoreParams& p = bp.p;
  const int tid = threadIdx.x, N = p.N, P = p.P, R = p.R;
  float* par = sm + lay.par;
  load_head_params(p, ck.h, par, par + R * P, par + 2 * R * P, par + 3 * R * P, tid, kThreads);
  __syncthreads();
  load_chunk(bp, ck, lay, sm, sm + lay.tl, false, true, true, tid);
  const float* fw = sm + lay.scal + kFw * kMaxRows;
  float* V = sm + lay.v;
  const float* K = sm + lay.k;
  for (int i = tid; i < ck.mr * P; i += kThreads) V[(i / P) * lay.vp + i % P] *= fw[(i / P) / R];
  __syncthreads();
  const int64_t cell = static_cast<int64_t>(ck.cid) * p.H + ck.h;
  float* out = bp.ws.s_prev + cell * P * N;
  block_gemm<4, 4>(
      P, N, ck.mr, [&](int x, int k) { return V[k * lay.vp + x]; },
      [&](int k, int n) { return K[k * lay.qn + n]; },
      [&](int x, int n, float acc) { out[static_cast<int64_t>(x) * N + n] = acc; }, tid);
  if (tid == 0) bp.ws.decay[cell] = sm[lay.scal + kE * kMaxRows + ck.m - 1];
}

// kV consecutive floats of a state (kV = 4: one 16-byte access; the address is 16-byte aligned).
template <int kV>
__device__ __forceinline__ void ld_state(const float* src, float (&x)[kV]) {
  if constexpr (kV == 4) {
    const float4 t = *reinterpret_cast<const float4*>(src);
    x[0] = t.x, x[1] = t.y, x[2] = t.z, x[3] = t.w;
  } else {
#pragma unroll
    for (int v = 0; v < kV; ++v) x[v] = src[v];
  }
}
template <int kV>
__device__ __forceinline__ void st_state(float* dst, const float (&x)[kV]) {
  if constexpr (kV == 4) {
    *reinterpret_cast<float4*>(dst) = make_float4(x[0], x[1], x[2], x[3]);
  } else {
#pragma unroll
    for (int v = 0; v < kV; ++v) dst[v] = x[v];
  }
}

// grid (S * H, ceil(P * N / (kV kThreads))): chunk-start states, in place over the increments:
// S_0 = S0 + sg0 sum_r (v0 psi_r) k0_r^T; S_{c+1} = decay_c S_c + increment_c. Each thread
// scans kV consecutive elements (kV = 4 where N % 4 == 0: 16-byte accesses, four times the bytes
// in flight per thread; the same operations per element).
template <int kV>
__global__ void __launch_bounds__(kThreads) bwd_state_scan_kernel(BwdParams bp) {
  M3B_DYNAMIC_SMEM(sm);
  const CoreParams& p = bp.p;
  const int s = blockIdx.x / p.H, h = blockIdx.x % p.H, tid = threadIdx.x;
  const int R = p.R, P = p.P, N = p.N;
  load_head_params(p, h, sm, sm + R * P, sm + 2 * R * P, sm + 3 * R * P, tid, kThreads);
  __syncthreads();
  const int e = (blockIdx.y * kThreads + tid) * kV;
  if (e >= P * N) return;
  const SeqInfo q = seq_info(p, s);
  const float sg0 = q.n > 0 && p.init_ssm.defined()
                        ? (1.f - sigmoidf_(in_bhl(p.trap, q.b, h, q.begin))) * in_bhl(p.dt, q.b, h, q.begin)
                        : 0.f;
  float st[kV];
#pragma unroll
  for (int v = 0; v < kV; ++v) st[v] = initial_state_elem(p, s, h, (e + v) / N, (e + v) % N, sg0, sm);
  const int c0 = bp.ws.chunk_off[s], c1 = bp.ws.chunk_off[s + 1];
  for (int cb = c0; cb < c1; cb += kScanBatch) {  // loads of a batch in flight together
    float inc[kScanBatch][kV], dec[kScanBatch];
#pragma unroll
    for (int u = 0; u < kScanBatch; ++u) {
      const int64_t cell = static_cast<int64_t>(cb + u) * p.H + h;
      if (cb + u < c1) {
        ld_state<kV>(bp.ws.s_prev + cell * P * N + e, inc[u]);
        dec[u] = bp.ws.decay[cell];
      }
    }
#pragma unroll
    for (int u = 0; u < kScanBatch; ++u)
      if (cb + u < c1) {
        st_state<kV>(bp.ws.s_prev + (static_cast<int64_t>(cb + u) * p.H + h) * P * N + e, st);
#pragma unroll
        for (int v = 0; v < kV; ++v) st[v] = dec[u] * st[v] + inc[u][v];
      }
  }
}

// The output stage's adjoint at (row, x) of a chunk (DESIGN §2.2, common/epilogue.h), from the
// cotangent g of out, the gate input z (unused without z) and y.
struct EpiAdjoint {
  float dyn;   // d(normed y)
  float du;    // d(z * zeta) (0 without z)
  float dphi;  // d phi contribution (0 for per-rank output)
};

// kFast (the tensor-core kernels): the gate's sigmoid on the MUFU (sigmoid_approx, ~2^-21
// relative error) as the tensor-core forward's silu_approx, instead of expf and an IEEE division.
template <bool kFast = false>
__device__ __forceinline__ EpiAdjoint epilogue_adjoint(const CoreParams& p, float g, float z, int r,
                                                       int x, float y, float rstd,
                                                       const float* zeta, const float* phi,
                                                       const float* wn) {
  const int P = p.P;
  const bool reduce = !p.per_rank_out;
  const float yn = p.norm_weight.defined() ? y * rstd * wn[x] : y;
  EpiAdjoint o{0.f, 0.f, 0.f};
  float gate = 1.f, dgate = 0.f;
  if (p.z.defined()) {
    const float u = z * zeta[r * P + x], sg = kFast ? sigmoid_approx(u) : sigmoidf_(u);
    gate = u * sg;
    dgate = sg * (1.f + u * (1.f - sg));
  }
  float gphi = g;
  if (reduce) {
    o.dphi = g * yn * gate;
    gphi = g * phi[r * P + x];
  }
  o.dyn = gphi * gate;
  if (p.z.defined()) o.du = gphi * yn * dgate;
  return o;
}

// The rest of the output stage's adjoint in chunk_out (SIMT and tensor-core kernels); y, the
// cotangent of out (per token, or per row for per-rank output) and z are fp32 rows of pitch yp
// in shared memory, zeta, phi and wn the head's parameters.

// Rows row0, row0 + step, ... < rows of one column: st(row, ld(off(row))), the loads of up to 16
// rows issued before any of their stores (they would otherwise wait one by one).
template <typename LD, typename OFF, typename ST>
__device__ __forceinline__ void column_rows_batched(int row0, int rows, int step, LD ld, OFF off,
                                                    ST st) {
  constexpr int kB = 16;
  for (int r0 = row0; r0 < rows; r0 += kB * step) {
    float v[kB];
#pragma unroll
    for (int u = 0; u < kB; ++u) {
      const int row = r0 + u * step;
      v[u] = row < rows ? ld(off(row)) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kB; ++u)
      if (r0 + u * step < rows) st(r0 + u * step, v[u]);
  }
}

// Stages the cotangent of out (GO) and z (Z) of the chunk. Ends with a barrier. Where P and R
// are powers of two (P <= kThreads) each thread keeps one column and steps over rows, the
// offsets advanced per row, the dtype switch taken once and the loads batched; otherwise per
// element.
__device__ __forceinline__ void stage_out_cotangents(const BwdParams& bp, const Chunk& ck,
                                                     float* GO, float* Z, int yp, int tid) {
  const CoreParams& p = bp.p;
  const int P = p.P, R = p.R, h = ck.h;
  const bool reduce = !p.per_rank_out;
  const DTensor& go = bp.d_out;
  const int go_rows = reduce ? ck.m : ck.mr;
  const int64_t l0 = ck.begin + ck.t0;
  if (is_pow2(P) && P <= kThreads && is_pow2(R)) {
    const int lp = log2_pow2(P), x = tid & (P - 1), lr = log2_pow2(R), step = kThreads >> lp;
    auto to_go = [&](int row, float v) { GO[row * yp + x] = v; };
    with_load_ro(go, [&](auto ld) {
      if (reduce) {
        const int64_t base = ck.b * go.stride[0] + l0 * go.stride[1] + h * go.stride[2] +
                             x * go.stride[3];
        column_rows_batched(
            tid >> lp, go_rows, step, ld, [&](int row) { return base + row * go.stride[1]; },
            to_go);
      } else {
        const int64_t base = ck.b * go.stride[0] + l0 * go.stride[1] + h * go.stride[3] +
                             x * go.stride[4];
        column_rows_batched(
            tid >> lp, go_rows, step, ld,
            [&](int row) {
              return base + (row >> lr) * go.stride[1] + (row & (R - 1)) * go.stride[2];
            },
            to_go);
      }
    });
    if (p.z.defined()) {
      const int64_t base = ck.b * p.z.stride[0] + l0 * p.z.stride[1] + h * p.z.stride[2] +
                           x * p.z.stride[3];
      with_load_ro(p.z, [&](auto ld) {
        column_rows_batched(
            tid >> lp, ck.m, step, ld, [&](int t) { return base + t * p.z.stride[1]; },
            [&](int t, float v) { Z[t * yp + x] = v; });
      });
    }
    __syncthreads();
    return;
  }
#pragma unroll 8
  for (int i = tid; i < go_rows * P; i += kThreads) {
    const int row = i / P, x = i % P;
    const int64_t l = l0 + (reduce ? row : row / R);
    GO[row * yp + x] =
        reduce ? dload_ro(go, ck.b * go.stride[0] + l * go.stride[1] + h * go.stride[2] +
                                  x * go.stride[3])
               : dload_ro(go, ck.b * go.stride[0] + l * go.stride[1] + (row % R) * go.stride[2] +
                                  h * go.stride[3] + x * go.stride[4]);
  }
  if (p.z.defined()) {
#pragma unroll 8
    for (int i = tid; i < ck.m * P; i += kThreads) {
      const int t = i / P, x = i % P;
      Z[t * yp + x] = dload_ro(p.z, ck.b * p.z.stride[0] + (l0 + t) * p.z.stride[1] +
                                        h * p.z.stride[2] + x * p.z.stride[3]);
    }
  }
  __syncthreads();
}

// epilogue_adjoint at (row, x) of the chunk given the row's rstd.
__device__ __forceinline__ auto out_adjoint(const CoreParams& p, const float* GO, const float* Z,
                                            const float* Y, int yp, const float* zeta,
                                            const float* phi, const float* wn) {
  const int R = p.R;
  const bool reduce = !p.per_rank_out, has_z = p.z.defined();
  return [=, &p](int row, int x, float rs) {
    const int t = row / R, r = row % R;
    return epilogue_adjoint(p, GO[(reduce ? t : row) * yp + x], has_z ? Z[t * yp + x] : 0.f, r, x,
                            Y[row * yp + x], rs, zeta, phi, wn);
  };
}

// With the norm: rstd of every row and xr = mean(dyn * w * y) per row. Ends with a barrier.
template <typename FA>
__device__ __forceinline__ void out_norm_stats(const CoreParams& p, const float* Y, int yp, int mr,
                                               const float* wn, float* rstd, float* xr, FA adjoint,
                                               int warp, int lane) {
  constexpr int kWarps = kThreads / 32;
  const int P = p.P;
  if (!p.norm_weight.defined()) return;
  rows_rstd(Y, yp, mr, P, p.eps, rstd, warp, lane, kWarps);
  __syncthreads();
  for (int row = warp; row < mr; row += kWarps) {
    float dot = 0.f;
    for (int x = lane; x < P; x += 32)
      dot += adjoint(row, x, rstd[row]).dyn * wn[x] * Y[row * yp + x];
    dot = warp_sum(dot);
    if (lane == 0) xr[row] = dot / P;  // mean(dyn * w * y)
  }
  __syncthreads();
}

// grad.z of the chunk's tokens: sum over the ranks of du * zeta. Where P is a power of two
// (P <= kThreads) each thread keeps one column and steps over tokens, the dtype switch taken
// once.
template <typename FA>
__device__ __forceinline__ void store_out_dz(const BwdParams& bp, const Chunk& ck,
                                             const float* zeta, const float* rstd, FA adjoint,
                                             int tid) {
  const DTensor& gz = bp.g_z;
  if (!gz.defined()) return;
  const int P = bp.p.P, R = bp.p.R;
  const bool norm = bp.p.norm_weight.defined();
  auto dz_at = [&](int t, int x) {
    float acc = 0.f;
    for (int r = 0; r < R; ++r) {
      const int row = t * R + r;
      acc += adjoint(row, x, norm ? rstd[row] : 1.f).du * zeta[r * P + x];
    }
    return acc;
  };
  const int64_t row0 = ck.b * gz.stride[0] +
                       static_cast<int64_t>(ck.begin + ck.t0) * gz.stride[1] + ck.h * gz.stride[2];
  if (is_pow2(P) && P <= kThreads) {
    const int lp = log2_pow2(P), x = tid & (P - 1);
    const int64_t base = row0 + x * gz.stride[3];
    with_store(gz, [&](auto store) {
      for (int t = tid >> lp; t < ck.m; t += kThreads >> lp)
        store(base + t * gz.stride[1], dz_at(t, x));
    });
    return;
  }
  for (int i = tid; i < ck.m * P; i += kThreads) {
    const int t = i / P, x = i % P;
    dstore(gz, row0 + t * gz.stride[1] + x * gz.stride[3], dz_at(t, x));
  }
}

// dy at (row, x) from the adjoint there, in place of y (read and written by the calling thread
// only) and to the workspace; returns it.
template <typename FA>
__device__ __forceinline__ float out_dy(const BwdParams& bp, const Chunk& ck, int row, int x,
                                        float* Y, int yp, const float* rstd, const float* xr,
                                        const float* wn, FA adjoint) {
  const CoreParams& p = bp.p;
  const int P = p.P, R = p.R, t = row / R, r = row % R;
  const bool norm = p.norm_weight.defined();
  const float rs = norm ? rstd[row] : 1.f;
  const float dyn = adjoint(row, x, rs).dyn;
  const float y = Y[row * yp + x];
  const float dy = norm ? rs * (dyn * wn[x] - y * rs * rs * xr[row]) : dyn;
  Y[row * yp + x] = dy;
  bp.ws.dy[((ck.l_abs0 + t) * p.H + ck.h) * static_cast<int64_t>(R * P) + r * P + x] = dy;
  return dy;
}

// grid (chunks, H): y of the chunk recomputed from its start state, then the output stage's
// adjoint: dy (workspace), dz (written), partials of d zeta, d phi, d norm_weight, d D, and the
// chunk's increment of the state cotangent sum_i e_i dy_i q_i^T (in place of ds_end).
__global__ void __launch_bounds__(kThreads, 1) bwd_chunk_out_kernel(BwdParams bp, BwdSmem lay) {
  M3B_DYNAMIC_SMEM(sm);
  Chunk ck;
  if (!find_chunk(bp, blockIdx.x, blockIdx.y, &ck)) return;
  const CoreParams& p = bp.p;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int N = p.N, P = p.P, R = p.R, m = ck.m, mr = ck.mr, h = ck.h;
  float* psi = sm + lay.par;
  float* zeta = psi + R * P;
  float* phi = zeta + R * P;
  float* wn = phi + R * P;
  load_head_params(p, h, psi, zeta, phi, wn, tid, kThreads);
  __syncthreads();
  load_chunk(bp, ck, lay, sm, sm + lay.tl, true, true, true, tid);
  const float* sc = sm + lay.scal;
  const float* cs = sc + kCs * kMaxRows;
  const float* ex = sc + kE * kMaxRows;
  const float* w = sc + kW * kMaxRows;
  const float* gam = sc + kGam * kMaxRows;
  float* xr = sm + lay.scal + kXr * kMaxRows;
  float* rstd = sm + lay.scal + kRstd * kMaxRows;
  const float* Q = sm + lay.q;
  const float* K = sm + lay.k;
  const float* V = sm + lay.v;
  float* A = sm + lay.ra;
  float* Y = sm + lay.dy;
  float* TL = sm + lay.tl;
  const float dskip = p.d.defined() ? dload_ro(p.d, h * p.d.stride[0]) : 0.f;
  const int64_t cell = static_cast<int64_t>(ck.cid) * p.H + h;

  // A = (Q K^T) o M; Y = A V + D V + diag(e) Q S_prev^T.
  block_gemm<4, 4>(
      mr, mr, N, [&](int i, int k) { return Q[i * lay.qn + k]; },
      [&](int k, int j) { return K[j * lay.qn + k]; },
      [&](int i, int j, float acc) { A[i * lay.ap + j] = acc * mask_coef(cs, w, gam, i / R, j / R); },
      tid);
  __syncthreads();
  block_gemm<4, 4>(
      mr, P, mr, [&](int i, int k) { return A[i * lay.ap + k]; },
      [&](int k, int j) { return V[k * lay.vp + j]; },
      [&](int i, int j, float acc) { Y[i * lay.vp + j] = acc + dskip * V[i * lay.vp + j]; }, tid);
  const float* sprev = bp.ws.s_prev + cell * P * N;
  for (int x0 = 0; x0 < P; x0 += kTileX) {
    const int tx = imin(kTileX, P - x0);
    __syncthreads();
    stage_state_tile(sprev, x0, tx, N, lay.qn, TL, tid);
    __syncthreads();
    block_gemm<2, 4>(
        mr, tx, N, [&](int i, int k) { return Q[i * lay.qn + k]; },
        [&](int k, int j) { return TL[j * lay.qn + k]; },
        [&](int i, int j, float acc) { Y[i * lay.vp + x0 + j] += ex[i / R] * acc; }, tid);
  }
  __syncthreads();

  // Output stage adjoint (norm statistics first; they read y). The cotangent of out (per token,
  // or per row for per-rank output) and z are staged in shared memory first.
  float* GO = sm + lay.go;
  float* Z = sm + lay.z;
  const bool has_z = p.z.defined(), norm = p.norm_weight.defined();
  stage_out_cotangents(bp, ck, GO, Z, lay.vp, tid);
  const auto adjoint = out_adjoint(p, GO, Z, Y, lay.vp, zeta, phi, wn);
  out_norm_stats(p, Y, lay.vp, mr, wn, rstd, xr, adjoint, warp, lane);
  float* par = bp.ws.par + cell * bp.pf.count;
  for (int i = tid; i < R * P; i += kThreads) {  // d zeta, d phi: sums over the chunk's tokens
    const int r = i / P, x = i % P;
    float dz = 0.f, dph = 0.f;
    for (int t = 0; t < m; ++t) {
      const int row = t * R + r;
      const EpiAdjoint e = adjoint(row, x, norm ? rstd[row] : 1.f);
      dz += e.du * (has_z ? Z[t * lay.vp + x] : 0.f);
      dph += e.dphi;
    }
    par[bp.pf.zeta + i] = dz;
    par[bp.pf.phi + i] = dph;
  }
  for (int x = tid; x < P; x += kThreads) {  // d norm_weight
    float acc = 0.f;
    if (norm)
      for (int row = 0; row < mr; ++row)
        acc += adjoint(row, x, rstd[row]).dyn * Y[row * lay.vp + x] * rstd[row];
    par[bp.pf.w + x] = acc;
  }
  store_out_dz(bp, ck, zeta, rstd, adjoint, tid);
  __syncthreads();
  float dd = 0.f;
  for (int i = tid; i < mr * P; i += kThreads) {
    const int row = i / P, x = i % P;
    dd += out_dy(bp, ck, row, x, Y, lay.vp, rstd, xr, wn, adjoint) * V[row * lay.vp + x];
  }
  dd = block_sum(dd, sm + lay.red, tid);  // has barriers: Y is complete after it
  if (tid == 0) par[bp.pf.d] = dd;
  for (int i = tid; i < mr * P; i += kThreads) Y[(i / P) * lay.vp + i % P] *= ex[(i / P) / R];
  __syncthreads();
  float* dsi = bp.ws.ds_end + cell * P * N;
  block_gemm<4, 4>(
      P, N, mr, [&](int x, int k) { return Y[k * lay.vp + x]; },
      [&](int k, int n) { return Q[k * lay.qn + n]; },
      [&](int x, int n, float acc) { dsi[static_cast<int64_t>(x) * N + n] = acc; }, tid);
}

// grid (S * H, ceil(P * N / (kV kThreads))): the state cotangent at each chunk end, in place
// over the increments (dS_end_last = d final ssm; dS_end_{c-1} = decay_c dS_end_c +
// increment_c); the cotangent of the effective initial state goes to grad.initial.ssm and the
// workspace. kV consecutive elements per thread, as bwd_state_scan_kernel.
template <int kV>
__global__ void __launch_bounds__(kThreads) bwd_dstate_scan_kernel(BwdParams bp) {
  const CoreParams& p = bp.p;
  const int s = blockIdx.x / p.H, h = blockIdx.x % p.H;
  const int P = p.P, N = p.N, e = (blockIdx.y * kThreads + threadIdx.x) * kV;
  if (e >= P * N) return;
  float ds[kV];
#pragma unroll
  for (int v = 0; v < kV; ++v) {
    const int x = (e + v) / N, n = (e + v) % N;
    ds[v] = bp.df_ssm.defined()
                ? dload(bp.df_ssm, s * bp.df_ssm.stride[0] + h * bp.df_ssm.stride[1] +
                                       x * bp.df_ssm.stride[2] + n * bp.df_ssm.stride[3])
                : 0.f;
  }
  const int c0 = bp.ws.chunk_off[s], c1 = bp.ws.chunk_off[s + 1];
  for (int cb = c1 - 1; cb >= c0; cb -= kScanBatch) {  // chunks cb, cb - 1, ... (batched loads)
    float inc[kScanBatch][kV], dec[kScanBatch];
#pragma unroll
    for (int u = 0; u < kScanBatch; ++u) {
      const int64_t cell = static_cast<int64_t>(cb - u) * p.H + h;
      if (cb - u >= c0) {
        ld_state<kV>(bp.ws.ds_end + cell * P * N + e, inc[u]);
        dec[u] = bp.ws.decay[cell];
      }
    }
#pragma unroll
    for (int u = 0; u < kScanBatch; ++u)
      if (cb - u >= c0) {
        st_state<kV>(bp.ws.ds_end + (static_cast<int64_t>(cb - u) * p.H + h) * P * N + e, ds);
#pragma unroll
        for (int v = 0; v < kV; ++v) ds[v] = dec[u] * ds[v] + inc[u][v];
      }
  }
#pragma unroll
  for (int v = 0; v < kV; ++v) {
    const int x = (e + v) / N, n = (e + v) % N;
    if (bp.gi_ssm.defined())
      dstore(bp.gi_ssm, s * bp.gi_ssm.stride[0] + h * bp.gi_ssm.stride[1] +
                            x * bp.gi_ssm.stride[2] + n * bp.gi_ssm.stride[3],
             ds[v]);
    if (bp.ws.ds0) bp.ws.ds0[(static_cast<int64_t>(s) * p.H + h) * P * N + e + v] = ds[v];
  }
}

// Rotation adjoint of the rows of token t, pair i: d(rotated) in D (pitch dp) becomes d(unrotated)
// in place; returns sum_r d theta = -d_a x_b + d_b x_a with x the rotated rows (pitch xp).
__device__ __forceinline__ float rope_adjoint_rows(float* D, int dp, const float* X, int xp, int t,
                                                   int i, int R, int N, bool interleaved,
                                                   float theta) {
  int ia, ib;
  pair_members(interleaved, N, i, &ia, &ib);
  float sn, cn;
  sincosf(theta, &sn, &cn);
  float acc = 0.f;
  for (int r = 0; r < R; ++r) {
    const int row = t * R + r;
    const float da = D[row * dp + ia], db = D[row * dp + ib];
    acc += -da * X[row * xp + ib] + db * X[row * xp + ia];
    D[row * dp + ia] = da * cn + db * sn;
    D[row * dp + ib] = -da * sn + db * cn;
  }
  return acc;
}

// Writes the unrotated q or k gradient rows (ST, pitch sp) of a chunk: straight to the grad when
// the head is alone in its group, else to the per-head workspace; and the bias partial. Where N
// and R are powers of two (N <= kThreads: the tensor-core path always) each thread keeps one column
// and steps over rows, the offsets advanced per row and the dtype switch taken once; otherwise
// per element. The same values land at the same places either way.
__device__ __forceinline__ void store_qk_grad(const BwdParams& bp, const Chunk& ck, int sp,
                                              const float* ST, const DTensor& grad, float* ws,
                                              float* par_bias, int tid) {
  const CoreParams& p = bp.p;
  const int N = p.N, R = p.R;
  if (grad.defined() && is_pow2(N) && N <= kThreads && is_pow2(R)) {
    // Shifts, not divisions: the compiler rematerializes loop-invariant values under register
    // pressure, and a division by a runtime N inside the loop costs ~25 instructions.
    const int ln = log2_pow2(N), n = tid & (N - 1), lr = log2_pow2(R), step = kThreads >> ln;
    if (ws) {
      const int64_t t_stride = static_cast<int64_t>(p.H) * R * N;
      float* base = ws + (ck.l_abs0 * p.H + ck.h) * static_cast<int64_t>(R * N) + n;
      for (int row = tid >> ln; row < ck.mr; row += step)
        base[(row >> lr) * t_stride + (row & (R - 1)) * N] = ST[row * sp + n];
    } else {
      const int64_t base = qk_off(grad, ck.b, ck.begin + ck.t0, 0, ck.g, n);
      const int64_t s_t = grad.stride[1], s_r = grad.ndim == 4 ? 0 : grad.stride[2];
      with_store(grad, [&](auto store) {
        for (int row = tid >> ln; row < ck.mr; row += step)
          store(base + (row >> lr) * s_t + (row & (R - 1)) * s_r, ST[row * sp + n]);
      });
    }
  } else if (grad.defined()) {
    for (int i = tid; i < ck.mr * N; i += kThreads) {
      const int row = i / N, n = i % N, t = row / R, r = row % R;
      const float val = ST[row * sp + n];
      if (ws)
        ws[((ck.l_abs0 + t) * p.H + ck.h) * static_cast<int64_t>(R * N) + r * N + n] = val;
      else
        dstore(grad, qk_off(grad, ck.b, ck.begin + ck.t0 + t, r, ck.g, n), val);
    }
  }
  for (int i = tid; i < R * N; i += kThreads) {
    const int r = i / N, n = i % N;
    float acc = 0.f;
    for (int t = 0; t < ck.m; ++t) acc += ST[(t * R + r) * sp + n];
    par_bias[i] = acc;
  }
}

// Per-token results of a chunk (chunk_grad kernels, after a barrier; every thread calls it, and it
// has a barrier): d adt (reverse cumulative sum of d cs inside the chunk), d gamma, d w, d theta
// per token and the chunk's d theta sum. No serial loop over the chunk's tokens holds the CTA:
// d adt is a shuffle scan on the last warp (two tokens a lane), and the d theta sums are partial
// sums over the tokens t = w mod 8 on every warp w, then added in warp order from `scratch`
// (>= 8 NA floats of shared memory nothing reads any more). A fixed order: deterministic.
__device__ __forceinline__ void chunk_token_outputs(const BwdParams& bp, const Chunk& ck,
                                                    const float* dcs, const float* dgam,
                                                    const float* dwt, const float* DTH,
                                                    float* scratch, int tid) {
  const CoreParams& p = bp.p;
  const int m = ck.m, h = ck.h, NA = p.NA, lane = tid & 31, warp = tid >> 5;
  constexpr int kWarps = kThreads / 32;
  const int64_t cell = static_cast<int64_t>(ck.cid) * p.H + h;
  static_assert(kMaxRows <= 64, "d adt: two tokens a lane of one warp");
  if (warp == kWarps - 1 && bp.g_adt.defined()) {
    const int t0 = 2 * lane;
    float s0, s1;  // d adt of tokens t0 and t0 + 1
    warp_pair_scan<true>(t0 < m ? dcs[t0] : 0.f, t0 + 1 < m ? dcs[t0 + 1] : 0.f, lane, s0, s1);
    const DTensor& g = bp.g_adt;
    const int64_t base = ck.b * g.stride[0] + h * g.stride[1] +
                         static_cast<int64_t>(ck.begin + ck.t0) * g.stride[2];
    with_store(g, [&](auto store) {
      if (t0 < m) store(base + t0 * g.stride[2], s0);
      if (t0 + 1 < m) store(base + (t0 + 1) * g.stride[2], s1);
    });
  }
  if (tid < m) {
    const int64_t slot = static_cast<int64_t>(h) * bp.L_tot + ck.l_abs0 + tid;
    bp.ws.tok[slot] = dgam[tid];
    bp.ws.tok[static_cast<int64_t>(p.H) * bp.L_tot + slot] = dwt[tid];
  }
  for (int t = warp; t < m; t += kWarps)  // a warp per token (no index division)
    for (int a = lane; a < NA; a += 32)
      bp.ws.dth[((ck.l_abs0 + t) * p.H + h) * NA + a] = DTH[t * NA + a];
  for (int a = lane; a < NA; a += 32) {
    float part = 0.f;
    for (int t = warp; t < m; t += kWarps) part += DTH[t * NA + a];
    scratch[warp * NA + a] = part;
  }
  __syncthreads();
  for (int a = tid; a < NA; a += kThreads) {
    float sum = 0.f;
    for (int w = 0; w < kWarps; ++w) sum += scratch[w * NA + a];
    bp.ws.dthc[cell * NA + a] = sum;
  }
}

// Time-level T (m, m) row-major: T[ti][tj] = sum over the ranks of dA o raw for tj <= ti, 0 above
// the diagonal, from the unmasked fp32 scores DA and RA (mr, mr) of pitch ap.
// One warp per row ti, lanes over tj (no index division).
__device__ __forceinline__ void time_level_scores(const float* DA, const float* RA, int ap, int m,
                                                  int R, float* T, int tid) {
  for (int ti = tid / 32; ti < m; ti += kThreads / 32)
    for (int tj = tid % 32; tj < m; tj += 32) {
      float acc = 0.f;
      if (tj <= ti)
        for (int r = 0; r < R; ++r)
          for (int r2 = 0; r2 < R; ++r2) {
            const int a = (ti * R + r) * ap + tj * R + r2;
            acc += DA[a] * RA[a];
          }
      T[ti * m + tj] = acc;
    }
}

// grad.v of the chunk's tokens: dv = sum_r dV_r psi_r (+ d final v on the sequence's last
// token), from the dV rows (mr, P) of pitch sp. Where P is a power of two (P <= kThreads) each
// thread keeps one column and steps over tokens, the dtype switch taken once.
__device__ __forceinline__ void store_dv(const BwdParams& bp, const Chunk& ck, const float* DV,
                                         int sp, const float* psi, int tid) {
  const DTensor& gv = bp.g_v;
  if (!gv.defined()) return;
  const int P = bp.p.P, R = bp.p.R, m = ck.m, h = ck.h;
  const bool dfv = ck.last && bp.df_v.defined();
  auto dv_at = [&](int t, int x) {
    float acc = 0.f;
    for (int r = 0; r < R; ++r) acc += DV[(t * R + r) * sp + x] * psi[r * P + x];
    if (dfv && t == m - 1) acc += dload(bp.df_v, shx_off(bp.df_v, ck.s, h, x));
    return acc;
  };
  const int64_t row0 = ck.b * gv.stride[0] + static_cast<int64_t>(ck.begin + ck.t0) * gv.stride[1] +
                       h * gv.stride[2];
  if (is_pow2(P) && P <= kThreads) {
    const int lp = log2_pow2(P), x = tid & (P - 1);
    const int64_t base = row0 + x * gv.stride[3];
    with_store(gv, [&](auto store) {
      for (int t = tid >> lp; t < m; t += kThreads >> lp)
        store(base + t * gv.stride[1], dv_at(t, x));
    });
    return;
  }
  for (int i = tid; i < m * P; i += kThreads) {
    const int t = i / P, x = i % P;
    dstore(gv, row0 + t * gv.stride[1] + x * gv.stride[3], dv_at(t, x));
  }
}

// grid (chunks, H): every gradient of the chunk given its start state S_prev, the cotangent dS
// of its end state and dy:
//   raw = Q K^T, dA = dY V^T        -> d gamma, d w, d cs of the mask
//   dV = Am^T dY + fw (K dS^T) + D dY               -> dv, d psi partial
//   dK = dAm^T Q + fw (V dS) (+ d final k)          -> rope adjoint -> dk, d k_bias partial
//   dQ = dAm K + e (dY S_prev)                      -> rope adjoint -> dq, d q_bias partial
//   d cs from e, fw and exp(cs_last) (sum dS o S_prev); then d adt (written), d gamma, d w,
//   d theta per token and per chunk (workspace).
__global__ void __launch_bounds__(kThreads, 1) bwd_chunk_grad_kernel(BwdParams bp, BwdSmem lay) {
  M3B_DYNAMIC_SMEM(sm);
  Chunk ck;
  if (!find_chunk(bp, blockIdx.x, blockIdx.y, &ck)) return;
  const CoreParams& p = bp.p;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  constexpr int kWarps = kThreads / 32;
  const int N = p.N, P = p.P, R = p.R, NA = p.NA, m = ck.m, mr = ck.mr, h = ck.h;
  float* psi = sm + lay.par;
  load_head_params(p, h, psi, psi + R * P, psi + 2 * R * P, psi + 3 * R * P, tid, kThreads);
  __syncthreads();
  load_chunk(bp, ck, lay, sm, sm + lay.tl, true, true, true, tid);
  float* sc = sm + lay.scal;
  const float* cs = sc + kCs * kMaxRows;
  const float* ex = sc + kE * kMaxRows;
  const float* w = sc + kW * kMaxRows;
  const float* fw = sc + kFw * kMaxRows;
  const float* gam = sc + kGam * kMaxRows;
  float* dcs = sc + kDcs * kMaxRows;
  float* dwt = sc + kDw * kMaxRows;
  float* dgam = sc + kDgam * kMaxRows;
  float* xr = sc + kXr * kMaxRows;
  const float* Q = sm + lay.q;
  const float* K = sm + lay.k;
  const float* V = sm + lay.v;
  float* DY = sm + lay.dy;
  float* RA = sm + lay.ra;
  float* DA = sm + lay.da;
  float* ST = sm + lay.st;
  float* TL = sm + lay.tl;
  const float* TH = sm + lay.th;
  float* DTH = sm + lay.dth;
  const float dskip = p.d.defined() ? dload_ro(p.d, h * p.d.stride[0]) : 0.f;
  const int64_t cell = static_cast<int64_t>(ck.cid) * p.H + h;
  const float* sprev = bp.ws.s_prev + cell * P * N;
  const float* dsend = bp.ws.ds_end + cell * P * N;
  float* par = bp.ws.par + cell * bp.pf.count;

#pragma unroll 8
  for (int i = tid; i < lay.rows * P; i += kThreads) {
    const int row = i / P, x = i % P;
    DY[row * lay.vp + x] =
        row < mr ? bp.ws.dy[((ck.l_abs0 + row / R) * p.H + h) * static_cast<int64_t>(R * P) +
                            (row % R) * P + x]
                 : 0.f;
  }
  __syncthreads();

  // raw = Q K^T and dA = dY V^T (unmasked).
  block_gemm<4, 4>(
      mr, mr, N, [&](int i, int k) { return Q[i * lay.qn + k]; },
      [&](int k, int j) { return K[j * lay.qn + k]; },
      [&](int i, int j, float acc) { RA[i * lay.ap + j] = acc; }, tid);
  block_gemm<4, 4>(
      mr, mr, P, [&](int i, int k) { return DY[i * lay.vp + k]; },
      [&](int k, int j) { return V[j * lay.vp + k]; },
      [&](int i, int j, float acc) { DA[i * lay.ap + j] = acc; }, tid);
  __syncthreads();
  // Time-level T[ti][tj] = sum over the ranks of dA o raw (tj <= ti), in the staging buffer.
  float* T = ST;
  time_level_scores(DA, RA, lay.ap, m, R, T, tid);
  __syncthreads();
  if (tid < m) {
    const int t = tid;
    float dw_acc = 0.f, dc = 0.f;
    for (int i = t + 1; i < m; ++i) {  // t as the key token j of later query tokens i
      const float e = expf(cs[i] - cs[t]);
      dw_acc += T[i * m + t] * e;
      dc -= T[i * m + t] * e * w[t];
    }
    for (int j = 0; j < t; ++j) dc += T[t * m + j] * expf(cs[t] - cs[j]) * w[j];
    dgam[t] = T[t * m + t];
    dwt[t] = dw_acc;
    dcs[t] = dc;
  }
  __syncthreads();
  for (int i = tid; i < mr * mr; i += kThreads) {  // mask in place: Am, dAm
    const int row = i / mr, col = i % mr;
    const float coef = mask_coef(cs, w, gam, row / R, col / R);
    RA[row * lay.ap + col] *= coef;
    DA[row * lay.ap + col] *= coef;
  }
  __syncthreads();

  // dV. First K dS^T (mr, P) into ST by tiles of dS rows, then x_t = sum v o (K dS^T).
  for (int x0 = 0; x0 < P; x0 += kTileX) {
    const int tx = imin(kTileX, P - x0);
    __syncthreads();
    stage_state_tile(dsend, x0, tx, N, lay.qn, TL, tid);
    __syncthreads();
    block_gemm<2, 4>(
        mr, tx, N, [&](int i, int k) { return K[i * lay.qn + k]; },
        [&](int k, int j) { return TL[j * lay.qn + k]; },
        [&](int i, int j, float acc) { ST[i * lay.sp + x0 + j] = acc; }, tid);
  }
  __syncthreads();
  for (int row = warp; row < mr; row += kWarps) {
    float acc = 0.f;
    for (int x = lane; x < P; x += 32) acc += V[row * lay.vp + x] * ST[row * lay.sp + x];
    acc = warp_sum(acc);
    if (lane == 0) xr[row] = acc;
  }
  __syncthreads();
  if (tid == 0) {
    float last = 0.f;
    for (int t = 0; t < m; ++t) {
      float xt = 0.f;
      for (int r = 0; r < R; ++r) xt += xr[t * R + r];
      dwt[t] += expf(cs[m - 1] - cs[t]) * xt;
      dcs[t] -= fw[t] * xt;
      last += fw[t] * xt;
    }
    dcs[m - 1] += last;
  }
  block_gemm<4, 4>(
      mr, P, mr, [&](int i, int k) { return RA[k * lay.ap + i]; },
      [&](int k, int j) { return DY[k * lay.vp + j]; },
      [&](int i, int j, float acc) {
        ST[i * lay.sp + j] = acc + fw[i / R] * ST[i * lay.sp + j] + dskip * DY[i * lay.vp + j];
      },
      tid);
  __syncthreads();
  {
    // dv, then the d psi partial.
    store_dv(bp, ck, ST, lay.sp, psi, tid);
    for (int i = tid; i < R * P; i += kThreads) {
      const int r = i / P, x = i % P;
      float acc = 0.f;
      for (int tb = 0; tb < m; tb += 8) {  // raw v in batches of 8 loads in flight
        float vv[8];
#pragma unroll
        for (int u = 0; u < 8; ++u)
          vv[u] = tb + u < m ? dload_ro(p.v, ck.b * p.v.stride[0] +
                                                 static_cast<int64_t>(ck.begin + ck.t0 + tb + u) * p.v.stride[1] +
                                                 h * p.v.stride[2] + x * p.v.stride[3])
                             : 0.f;
#pragma unroll
        for (int u = 0; u < 8; ++u)
          if (tb + u < m) acc += ST[((tb + u) * R + r) * lay.sp + x] * vv[u];
      }
      par[bp.pf.psi + i] = acc;
    }
  }

  // ST (mr, N) = A (mr, P) * state (P, N), accumulated over tiles of state rows staged in TL.
  auto rows_times_state = [&](const float* A, const float* state) {
    for (int x0 = 0; x0 < P; x0 += kTileX) {
      const int tx = imin(kTileX, P - x0);
      __syncthreads();
      stage_state_tile(state, x0, tx, N, lay.qn, TL, tid);
      __syncthreads();
      block_gemm<4, 4>(
          mr, N, tx, [&](int i, int k) { return A[i * lay.vp + x0 + k]; },
          [&](int k, int j) { return TL[k * lay.qn + j]; },
          [&](int i, int j, float acc) { ST[i * lay.sp + j] = (x0 == 0 ? 0.f : ST[i * lay.sp + j]) + acc; },
          tid);
    }
  };

  // dK. First V dS (mr, N) accumulated over tiles of dS rows, then the intra-chunk part.
  rows_times_state(V, dsend);
  __syncthreads();
  const bool dfk = ck.last && bp.df_k.defined();
  block_gemm<4, 4>(
      mr, N, mr, [&](int i, int k) { return DA[k * lay.ap + i]; },
      [&](int k, int j) { return Q[k * lay.qn + j]; },
      [&](int i, int j, float acc) {
        float v = acc + fw[i / R] * ST[i * lay.sp + j];
        if (dfk && i / R == m - 1) v += dload(bp.df_k, sk_off(bp.df_k, ck.s, i % R, h, j));
        ST[i * lay.sp + j] = v;
      },
      tid);
  __syncthreads();
  for (int i = tid; i < m * NA; i += kThreads) {
    const int t = i / NA, a = i % NA;
    DTH[i] = rope_adjoint_rows(ST, lay.sp, K, lay.qn, t, a, R, N, p.interleaved, TH[i]);
  }
  __syncthreads();
  store_qk_grad(bp, ck, lay.sp, ST, bp.g_k, bp.ws.dk, par + bp.pf.kb, tid);
  __syncthreads();

  // dQ. First T1 = dY S_prev (mr, N) accumulated over tiles, d cs from e, then the intra part.
  rows_times_state(DY, sprev);
  __syncthreads();
  for (int row = warp; row < mr; row += kWarps) {
    float acc = 0.f;
    for (int n = lane; n < N; n += 32) acc += ST[row * lay.sp + n] * Q[row * lay.qn + n];
    acc = warp_sum(acc);
    if (lane == 0) xr[row] = acc;
  }
  __syncthreads();
  if (tid < m) {
    float acc = 0.f;
    for (int r = 0; r < R; ++r) acc += xr[tid * R + r];
    dcs[tid] += ex[tid] * acc;
  }
  block_gemm<4, 4>(
      mr, N, mr, [&](int i, int k) { return DA[i * lay.ap + k]; },
      [&](int k, int j) { return K[k * lay.qn + j]; },
      [&](int i, int j, float acc) { ST[i * lay.sp + j] = acc + ex[i / R] * ST[i * lay.sp + j]; },
      tid);
  __syncthreads();
  for (int i = tid; i < m * NA; i += kThreads) {
    const int t = i / NA, a = i % NA;
    DTH[i] += rope_adjoint_rows(ST, lay.sp, Q, lay.qn, t, a, R, N, p.interleaved, TH[i]);
  }
  __syncthreads();
  store_qk_grad(bp, ck, lay.sp, ST, bp.g_q, bp.ws.dq, par + bp.pf.qb, tid);

  // d cs_last from the chunk decay: exp(cs_last) sum dS o S_prev.
  float acc = 0.f;
#pragma unroll 8
  for (int e = tid; e < P * N; e += kThreads) acc += dsend[e] * sprev[e];
  acc = block_sum(acc, sm + lay.red, tid);
  if (tid == 0) dcs[m - 1] += ex[m - 1] * acc;
  __syncthreads();
  chunk_token_outputs(bp, ck, dcs, dgam, dwt, DTH, ST, tid);  // ST: read for the last time above
}

// grid (chunks, H): B_a = d loss / d eps for rotating rope pair a of every token after the
// chunk's end by eps, for chunks that are not their sequence's last. Those tokens' q and k turn
// together, so only their pairing with the state S at the boundary changes (y = S q, S -> S R):
// B_a = sum_x dS[x][ia] S[x][ib] - dS[x][ib] S[x][ia] with S the next chunk's start state and dS
// this chunk's end cotangent (both fp32 in the workspace). The angle carry is the sum of the
// per-token rotation gradients of all later tokens, which cancel pairwise in exact arithmetic:
// summed along the sequence, their bf16 product errors (tensor-core path) grow with L while the
// carry does not (1.7e-2 on grad.angles at L = 512, R = 4 on the H200). The difference of two
// B's replaces those sums (bwd_dtheta_scan_kernel), so per-token errors stay inside their chunk.
// Each thread sums a fixed stride of rows of one pair; the groups are added in order.
__global__ void __launch_bounds__(kThreads) bwd_angle_boundary_kernel(BwdParams bp) {
  M3B_DYNAMIC_SMEM(red);  // (kThreads) group partials
  Chunk ck;
  if (!find_chunk(bp, blockIdx.x, blockIdx.y, &ck) || ck.last) return;
  const CoreParams& p = bp.p;
  const int tid = threadIdx.x, NA = p.NA, N = p.N, P = p.P, groups = kThreads / NA;
  const int64_t cell = static_cast<int64_t>(ck.cid) * p.H + ck.h;
  const float* ds = bp.ws.ds_end + cell * P * N;           // (P, N) cotangent at the chunk end
  const float* st = bp.ws.s_prev + (cell + p.H) * P * N;   // (P, N) next chunk's start state
  const int a = tid % NA, g = tid / NA;
  float acc = 0.f;
  if (g < groups) {
    int ia, ib;
    pair_members(p.interleaved, N, a, &ia, &ib);
    for (int x = g; x < P; x += groups)
      acc += ds[x * N + ia] * st[x * N + ib] - ds[x * N + ib] * st[x * N + ia];
  }
  red[tid] = acc;
  __syncthreads();
  if (tid < NA) {
    float sum = 0.f;
    for (int k = 0; k < groups; ++k) sum += red[k * NA + tid];
    bp.ws.bnd[cell * NA + tid] = sum;
  }
}

// grid S * H, 64 threads: the angle cotangent carried into each chunk's end (in place over the
// chunk sums), starting from d final angle; what remains is grad.initial.angle. Into the last
// chunk's end: d final angle; into the one before: that plus the last chunk's sum; into any
// earlier end c: the same plus B(c) - B(last - 1) (bwd_angle_boundary_kernel), not a sum of
// chunk sums, so per-chunk errors do not accumulate along the sequence.
__global__ void __launch_bounds__(64) bwd_dtheta_scan_kernel(BwdParams bp) {
  const CoreParams& p = bp.p;
  const int s = blockIdx.x / p.H, h = blockIdx.x % p.H, i = threadIdx.x;
  if (i >= p.NA) return;
  float carry = bp.df_angle.defined() ? dload(bp.df_angle, shx_off(bp.df_angle, s, h, i)) : 0.f;
  const int c0 = bp.ws.chunk_off[s], c1 = bp.ws.chunk_off[s + 1] - 1;
  auto at = [&](float* base, int c) {
    return base + (static_cast<int64_t>(c) * p.H + h) * p.NA + i;
  };
  if (c1 >= c0) {  // the last chunk
    float* slot = at(bp.ws.dthc, c1);
    const float sum = *slot;
    *slot = carry;
    carry += sum;
  }
  const float anchor = c1 > c0 ? carry - *at(bp.ws.bnd, c1 - 1) : 0.f;
  for (int cb = c1 - 1; cb >= c0; cb -= kScanBatch) {  // chunks cb, cb - 1, ... (batched loads)
    float sum[kScanBatch], bnd[kScanBatch];
#pragma unroll
    for (int u = 0; u < kScanBatch; ++u)
      if (cb - u >= c0) {
        sum[u] = *at(bp.ws.dthc, cb - u);
        bnd[u] = cb - u < c1 - 1 ? *at(bp.ws.bnd, cb - u) : 0.f;
      }
#pragma unroll
    for (int u = 0; u < kScanBatch; ++u) {
      const int c = cb - u;
      if (c < c0) break;
      if (c < c1 - 1) carry = anchor + bnd[u];
      *at(bp.ws.dthc, c) = carry;
      carry += sum[u];
    }
  }
  if (bp.gi_angle.defined()) dstore(bp.gi_angle, shx_off(bp.gi_angle, s, h, i), carry);
}

// grid S * H (initial states given): gradients of the initial k and v and of the initial pair
// S_eff = S0 + sg0 sum_r (v0 psi_r) k0_r^T, from the cotangent dS0 of S_eff:
//   dk0_r = sg0 dS0^T (v0 psi_r), dv0 = sg0 sum_r psi_r (dS0 k0_r), d psi_r += sg0 v0 (dS0 k0_r),
//   d sg0 = sum_r (v0 psi_r) . (dS0 k0_r). An empty sequence passes the final cotangents through.
__global__ void __launch_bounds__(kThreads) bwd_init_grads_kernel(BwdParams bp) {
  M3B_DYNAMIC_SMEM(sm);
  const CoreParams& p = bp.p;
  const int s = blockIdx.x / p.H, h = blockIdx.x % p.H, tid = threadIdx.x;
  const int R = p.R, P = p.P, N = p.N;
  float* psi = sm;                // psi, zeta, phi (R, P), norm weight (P)
  float* u = sm + 3 * R * P + P;  // (R, P): dS0 k0_r
  float* v0 = u + R * P;          // (P)
  load_head_params(p, h, psi, psi + R * P, psi + 2 * R * P, psi + 3 * R * P, tid, kThreads);
  const SeqInfo q = seq_info(p, s);
  const DTensor &gk = bp.gi_k, &gv = bp.gi_v;
  float* initp = bp.ws.initp + (static_cast<int64_t>(s) * p.H + h) * (R * P + 1);
  if (q.n == 0) {
    for (int i = tid; i < R * N; i += kThreads) {
      const int r = i / N, n = i % N;
      if (gk.defined())
        dstore(gk, sk_off(gk, s, r, h, n), bp.df_k.defined() ? dload(bp.df_k, sk_off(bp.df_k, s, r, h, n)) : 0.f);
    }
    for (int x = tid; x < P; x += kThreads)
      if (gv.defined())
        dstore(gv, shx_off(gv, s, h, x),
               bp.df_v.defined() ? dload(bp.df_v, shx_off(bp.df_v, s, h, x)) : 0.f);
    for (int i = tid; i <= R * P; i += kThreads) initp[i] = 0.f;
    return;
  }
  const float sg0 = (1.f - sigmoidf_(in_bhl(p.trap, q.b, h, q.begin))) * in_bhl(p.dt, q.b, h, q.begin);
  const float* ds0 = bp.ws.ds0 + (static_cast<int64_t>(s) * p.H + h) * P * N;
  for (int x = tid; x < P; x += kThreads) v0[x] = dload(p.init_v, shx_off(p.init_v, s, h, x));
  __syncthreads();
  for (int i = tid; i < R * P; i += kThreads) {
    const int r = i / P, x = i % P;
    float acc = 0.f;
    for (int n = 0; n < N; ++n) acc += ds0[x * N + n] * dload(p.init_k, sk_off(p.init_k, s, r, h, n));
    u[i] = acc;
    initp[i] = sg0 * v0[x] * acc;
  }
  __syncthreads();
  for (int x = tid; x < P; x += kThreads)
    if (gv.defined()) {
      float acc = 0.f;
      for (int r = 0; r < R; ++r) acc += psi[r * P + x] * u[r * P + x];
      dstore(gv, shx_off(gv, s, h, x), sg0 * acc);
    }
  for (int i = tid; i < R * N; i += kThreads)
    if (gk.defined()) {
      const int r = i / N, n = i % N;
      float acc = 0.f;
      for (int x = 0; x < P; ++x) acc += ds0[x * N + n] * v0[x] * psi[r * P + x];
      dstore(gk, sk_off(gk, s, r, h, n), sg0 * acc);
    }
  if (tid == 0) {
    float acc = 0.f;
    for (int r = 0; r < R; ++r)
      for (int x = 0; x < P; ++x) acc += v0[x] * psi[r * P + x] * u[r * P + x];
    initp[R * P] = acc;
  }
}

// Element i of a (token, angle) grid, row-major in NA columns, is (t, a) = (i / NA, i % NA).
// A thread that takes i, i + kThreads, ... steps its (t, a) by kThreads = dt NA + da instead of
// dividing per element: `at` once, then `next`.
struct TokenAngleStep {
  int NA, dt, da;
  __device__ explicit TokenAngleStep(int na) : NA(na), dt(kThreads / na), da(kThreads - dt * na) {}
  __device__ void at(int i, int& t, int& a) const {
    t = i / NA;
    a = i - t * NA;
  }
  __device__ void next(int& t, int& a) const {
    t += dt, a += da;
    if (a >= NA) a -= NA, ++t;
  }
};

// grid (chunks, H): per-token gradients of angles, dt, trap (lambda) from d gamma, d w, the
// rotation gradients and the angle carry; the sequence's first token takes the initial pair's
// d sg0. Inputs are staged in shared memory, rows at pitch NA + 1 (the launcher's layout takes
// NA + 1 columns) so that a thread per token walks its row without bank conflicts: TH holds
// tanh of the raw angles, DTH d theta, then its suffix sums, then the d dt parts. Only the
// suffix sum over the chunk's tokens is serial (one thread per angle, loads batched ahead of
// the additions); the tanh before it and the products after it run on every thread, with the
// same operations in the same order as one thread per angle doing all three.
__global__ void __launch_bounds__(kThreads) bwd_token_grads_kernel(BwdParams bp, BwdSmem lay) {
  M3B_DYNAMIC_SMEM(sm);
  Chunk ck;
  if (!find_chunk(bp, blockIdx.x, blockIdx.y, &ck)) return;
  const CoreParams& p = bp.p;
  const int tid = threadIdx.x, NA = p.NA, ap = NA + 1, h = ck.h, b = ck.b, m = ck.m;
  const int l0 = ck.begin + ck.t0;
  float* th = sm + lay.th;        // (C, ap): tanh of the raw angles
  float* ddt_ang = sm + lay.dth;  // (C, ap): d theta, its suffix sums, then their d dt parts
  float* dtv = sm + lay.scal + kDt * kMaxRows;
  float* trap = sm + lay.scal + kLam * kMaxRows;  // raw trap (lambda = its sigmoid)
  float* dgs = sm + lay.scal + kDgam * kMaxRows;  // d gamma + d w of token t
  float* prev = sm + lay.scal + kDw * kMaxRows;   // d sgamma from token t - 1, or the initial sg0
  const float pi_f = static_cast<float>(kPiD);
  {  // Element i is (token t, angle a) = (i / NA, i % NA). More elements than threads (`train`:
    // 64 x 32): batches of kB per thread, every load of a batch issued before the first use,
    // the dtype switch of angle_at taken once outside the loop, one division per batch and the
    // batch's other elements stepped from it (kThreads = dt NA + da). At most one per thread
    // (`megacpp`: 16 x 16): one element, as the batches cost 10 % there (H200, 2026-11-30).
    constexpr int kB = 4;
    const DTensor& an = p.angles;
    const int64_t a_base = b * an.stride[0] + h * an.stride[2];
    const float* dth = bp.ws.dth + ck.l_abs0 * p.H * NA + h * NA;
    const int64_t dth_t = static_cast<int64_t>(p.H) * NA;
    const int total = m * NA;
    if (total <= kThreads) {
      if (tid < total) {
        const int t = tid / NA, a = tid - t * NA;
        th[t * ap + a] = tanhf(angle_at(p, b, l0 + t, h, a));
        ddt_ang[t * ap + a] = dth[t * dth_t + a];
      }
    } else {
      const TokenAngleStep step(NA);  // NA > 0: total > kThreads
      with_load_ro(an, [&](auto ld) {
        for (int i0 = tid; i0 < total; i0 += kB * kThreads) {
          float va[kB], vd[kB];
          int ts[kB], as[kB], t, a;
          step.at(i0, t, a);
#pragma unroll
          for (int u = 0; u < kB; ++u) {
            ts[u] = t, as[u] = a;
            const bool in = i0 + u * kThreads < total;
            va[u] = in ? ld(a_base + static_cast<int64_t>(l0 + t) * an.stride[1] + a * an.stride[3])
                       : 0.f;
            vd[u] = in ? dth[t * dth_t + a] : 0.f;
            step.next(t, a);
          }
#pragma unroll
          for (int u = 0; u < kB; ++u)
            if (i0 + u * kThreads < total) {
              th[ts[u] * ap + as[u]] = tanhf(va[u]);
              ddt_ang[ts[u] * ap + as[u]] = vd[u];
            }
        }
      });
    }
  }
  if (tid < m) {  // staged, not held in registers across the phases
    const int64_t slot = static_cast<int64_t>(h) * bp.L_tot + ck.l_abs0 + tid;
    const float* dwt = bp.ws.tok + static_cast<int64_t>(p.H) * bp.L_tot;
    dtv[tid] = in_bhl(p.dt, b, h, l0 + tid);
    trap[tid] = in_bhl(p.trap, b, h, l0 + tid);
    dgs[tid] = bp.ws.tok[slot] + dwt[slot];
    float pv = 0.f;
    if (ck.t0 + tid > 0)
      pv = dwt[slot - 1];
    else if (bp.ws.initp)
      pv = bp.ws.initp[(static_cast<int64_t>(ck.s) * p.H + h) * (p.R * p.P + 1) + p.R * p.P];
    prev[tid] = pv;
  }
  __syncthreads();
  if (tid < NA) {  // d theta of token t: the carry into the chunk's end plus tokens t.. m - 1
    float dtheta = bp.ws.dthc[(static_cast<int64_t>(ck.cid) * p.H + h) * NA + tid];
    float* col = ddt_ang + tid;
    int t = m - 1;
    constexpr int kB = 8;
    for (; t >= kB - 1; t -= kB) {
      float v[kB];
#pragma unroll
      for (int u = 0; u < kB; ++u) v[u] = col[(t - u) * ap];
#pragma unroll
      for (int u = 0; u < kB; ++u) {
        dtheta += v[u];
        col[(t - u) * ap] = dtheta;
      }
    }
    for (; t >= 0; --t) {
      dtheta += col[t * ap];
      col[t * ap] = dtheta;
    }
  }
  __syncthreads();
  if (tid < m * NA) {  // element i = (token t, angle a) as in the staging above, stepped
    const DTensor& ga = bp.g_angles;
    const TokenAngleStep step(NA);
    auto products = [&](auto store) {
      int t, a;
      step.at(tid, t, a);
      for (int i = tid; i < m * NA; i += kThreads) {
        const float dtheta = ddt_ang[t * ap + a], tt = th[t * ap + a];
        store(t, a, dtheta * pi_f * dtv[t] * (1.f - tt * tt));  // d angles
        ddt_ang[t * ap + a] = dtheta * pi_f * tt;
        step.next(t, a);
      }
    };
    if (ga.defined()) {
      const int64_t base = b * ga.stride[0] + h * ga.stride[2] + l0 * ga.stride[1];
      const int64_t s_t = ga.stride[1], s_a = ga.stride[3];
      with_store(ga, [&](auto st) {
        products([&](int t, int a, float v) { st(base + t * s_t + a * s_a, v); });
      });
    } else {
      products([](int, int, float) {});
    }
  }
  __syncthreads();
  if (tid < m) {
    const int t = tid, l = l0 + t;
    float ddt = 0.f;
    for (int i = 0; i < NA; ++i) ddt += ddt_ang[t * ap + i];
    const float la = sigmoidf_(trap[t]), dl = dtv[t], dg = dgs[t], pv = prev[t];
    float dlam = dg * dl;
    ddt += dg * la;
    dlam -= pv * dl;
    ddt += pv * (1.f - la);
    if (bp.g_dt.defined())
      dstore(bp.g_dt, b * bp.g_dt.stride[0] + h * bp.g_dt.stride[1] + static_cast<int64_t>(l) * bp.g_dt.stride[2],
             ddt);
    if (bp.g_trap.defined())
      dstore(bp.g_trap,
             b * bp.g_trap.stride[0] + h * bp.g_trap.stride[1] + static_cast<int64_t>(l) * bp.g_trap.stride[2],
             dlam * la * (1.f - la));
  }
}

// Grid-stride over (token slot, group, rank, n): q or k gradient = sum of the per-head gradients
// of the group's heads, in head order.
__global__ void __launch_bounds__(kThreads) bwd_reduce_qk_kernel(BwdParams bp, const float* ws,
                                                                 DTensor grad) {
  const CoreParams& p = bp.p;
  const int N = p.N, R = p.R, G = p.G, hpg = p.hpg;
  const int64_t total = bp.L_tot * G * R * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int n = static_cast<int>(i % N), r = static_cast<int>((i / N) % R);
    const int g = static_cast<int>((i / (N * R)) % G);
    const int64_t slot = i / (static_cast<int64_t>(N) * R * G);
    float acc = 0.f;
    for (int h = g * hpg; h < (g + 1) * hpg; ++h)
      acc += ws[(slot * p.H + h) * static_cast<int64_t>(R * N) + r * N + n];
    const int b = static_cast<int>(slot / p.L), l = static_cast<int>(slot % p.L);
    dstore(grad, qk_off(grad, b, l, r, g, n), acc);
  }
}

// grid (H, ceil(fields / kThreads)): parameter gradients of head h = sum over every chunk of the
// call (in chunk order) of the partials, plus the initial pairs' d psi (in sequence order).
__global__ void __launch_bounds__(kThreads) bwd_reduce_par_kernel(BwdParams bp) {
  const CoreParams& p = bp.p;
  const int h = blockIdx.x, R = p.R, P = p.P, N = p.N;
  const ParFields& f = bp.pf;
  const int chunks = bp.ws.chunk_off[p.S];
  for (int k = blockIdx.y * kThreads + threadIdx.x; k < f.count; k += gridDim.y * kThreads) {
    // d psi partials exist only where grad.mimo_v is asked for (chunk_grad_tc skips them).
    if (k >= f.psi && k < f.qb && !bp.g_psi.defined()) continue;
    float acc = 0.f;
    const float* src = bp.ws.par + static_cast<int64_t>(h) * f.count + k;
    const int64_t stride = static_cast<int64_t>(p.H) * f.count;  // one chunk
    constexpr int kB = 16;  // loads in flight; the additions stay in chunk order
    for (int cb = 0; cb < chunks; cb += kB) {
      float v[kB];
#pragma unroll
      for (int u = 0; u < kB; ++u)
        if (cb + u < chunks) v[u] = src[(cb + u) * stride];
#pragma unroll
      for (int u = 0; u < kB; ++u)
        if (cb + u < chunks) acc += v[u];
    }
    if (k >= f.psi && k < f.psi + R * P && bp.ws.initp)
      for (int s = 0; s < p.S; ++s)
        acc += bp.ws.initp[(static_cast<int64_t>(s) * p.H + h) * (R * P + 1) + (k - f.psi)];
    auto rp = [&](const DTensor& t, int base) {
      if (!t.defined()) return;
      const int r = (k - base) / P, x = (k - base) % P;
      dstore(t, h * t.stride[0] + r * t.stride[1] + x * t.stride[2], acc);
    };
    if (k < f.phi) {
      rp(bp.g_zeta, f.zeta);
    } else if (k < f.w) {
      rp(bp.g_phi, f.phi);
    } else if (k < f.psi) {
      if (bp.g_w.defined()) dstore(bp.g_w, h * bp.g_w.stride[0] + (k - f.w) * bp.g_w.stride[1], acc);
    } else if (k < f.qb) {
      rp(bp.g_psi, f.psi);
    } else if (k < f.kb) {
      if (bp.g_qb.defined()) dstore(bp.g_qb, bias_off(bp.g_qb, h, (k - f.qb) / N, (k - f.qb) % N), acc);
    } else if (k < f.d) {
      if (bp.g_kb.defined()) dstore(bp.g_kb, bias_off(bp.g_kb, h, (k - f.kb) / N, (k - f.kb) % N), acc);
    } else if (bp.g_d.defined()) {
      dstore(bp.g_d, h * bp.g_d.stride[0], acc);
    }
  }
}

}  // namespace mamba3::cuda::bwd
