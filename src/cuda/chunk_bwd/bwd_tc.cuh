// Tensor-core pieces of the chunked backward (mma.sync m16n8k16, bf16 operands, fp32
// accumulation; src/cuda/common/mma.cuh): the chunk loader into bf16 tiles, a warp-tiled GEMM on
// bf16 shared-memory operands, and the tensor-core chunk_state kernel; chunk_out_tc and
// chunk_grad_tc are in bwd_tc_out.cuh and bwd_tc_grad.cuh (same math, grids and workspace as
// their SIMT versions in bwd_kernels.cuh). Taken for
// bf16 q, k, v with 16-byte aligned contiguous rows at N, P in {64, 128} (tensor_core_inputs and
// pick_rows_tc in bwd_launch.cuh; always 64-row chunks on the H200); everything else runs the
// fp32 SIMT kernels.
//
// The loader runs once per chunk: chunk_state_tc keeps its output (rotated q and k, v * psi,
// angles, scalars) in a tile record of the workspace, and chunk_out_tc and chunk_grad_tc copy it
// back with cp.async (tc_chunk_tiles) instead of repeating the loader's serial angle walk,
// cumulative sum and rotations. In training mode the forward has written the same records
// into its saved buffer (cuda/common/tile_record.cuh) and chunk_state_tc does not run.
//
// Shared memory at N = 128, P = 64, R = 1, NA = 32 (tc_layout): chunk_state 67 KB (three CTAs
// per SM), chunk_out ~95 KB and chunk_grad ~104 KB (two CTAs per SM each).
//
// Angles: the wrapped angles lie in [0, 2 pi), where __sincosf is accurate to ~1e-6 (the forward
// uses it too), far below the bf16 rounding of the tiles; it keeps the slow-path stack frame and
// the long polynomial of sincosf out of the loader and the rope adjoints.
//
// Rounding (DESIGN.md §2.6), the forward's discipline: rotated biased q and k, v * psi, dy, the
// masked scores and their gradient (A o M, dA o M), and the states S_prev and dS_end as operands
// are bf16 (for MIMO, chunk_grad's V dS_end and dY S_prev take them as two bf16 terms, hi + lo:
// those products feed the rotation gradients, see there); every product accumulates in fp32, and
// everything carried across chunks (states, state cotangents, angle carries, partial sums) stays
// fp32. The unmasked scores Q K^T and dY V^T that give the mask gradients are fp32
// accumulators, never rounded.
//
// Determinism: each output element of a product is owned by one warp, which accumulates its k
// tiles in a fixed order; no atomics.
#pragma once

#include "cuda/chunk_bwd/bwd_kernels.cuh"
#include "cuda/common/async_copy.cuh"
#include "cuda/common/mma.cuh"

namespace mamba3::cuda::bwd {

// Dynamic shared memory of the tensor-core kernels (16-byte aligned: ldmatrix rows, uint4 tiles).
#ifdef MAMBA3_CUDA_EMU
#define M3B_DYNAMIC_SMEM_TC(name) \
  unsigned char* name = reinterpret_cast<unsigned char*>(::m3emu::dynamic_smem())
#else
#define M3B_DYNAMIC_SMEM_TC(name)                              \
  extern __shared__ __align__(16) unsigned char bwd_tc_smem[]; \
  unsigned char* name = bwd_tc_smem
#endif

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }

// Shared-memory layout of the tensor-core chunk kernels; byte offsets, each 16-byte aligned
// (-1: not allocated). bf16 pitches pad rows by 16 bytes (conflict-free ldmatrix); fp32 pitches
// by one word.
struct TcSmem {
  int rows, C;
  int qp, vp, ap;  // bf16 pitches (elements): q/k and state rows (N + 8), v/dy rows (P + 8), scores
  int q, k, v, dy;  // (rows, N | P) bf16: rotated biased q, k; v * psi; dy (chunk_out: e dy)
  int vf;           // chunk_state: (rows, P) bf16 v * psi * fw
  int vr;           // chunk_out: (C, P) raw bf16 v of the chunk's tokens, pitch vp (the exact
                    // v psi of the D skip)
  int s;            // (P, N) bf16 state operand: chunk_grad dS_end then S_prev; chunk_out S_prev
  int am;           // (rows, ap) bf16 masked scores A o M (chunk_grad: then dA o M)
  int th, dth;      // (C, NA) fp32 wrapped angles, d theta (chunk_grad: in A o M's space where
                    // it fits, written once the dV product no longer reads A o M)
  int scal, par, red, bias;
  int bytes;
};

inline int tc_up16(int x) { return (x + 15) & ~15; }

// kTcOutY: chunk_out reading the forward's saved y (no k, state, score or v psi tiles).
enum TcKernel { kTcState, kTcOut, kTcGrad, kTcOutY };

// Partial-sum slots of chunk_grad_tc in lay.red (floats): rows of the score pass (per column
// half: d cs terms, d gamma terms), columns of the score pass (per row tile: d w terms), the
// x row sums of the dV and dQ phases (per column half), per-warp d cs_last terms, a copy of the
// block's Chunk (read back by the later phases instead of keeping it in registers); then the
// d psi partials (4 row tiles x R x P, where grad.mimo_v is asked for) and the bias partials
// (4 x R x N).
enum GradRed : int {
  kRedRowA = 0, kRedDiag = 128, kRedColB = 256, kRedX = 512, kRedX2 = 640, kRedDs = 768,
  kRedChunk = 784, kRedFixed = 800,
};
inline int grad_red_floats(int R, int P, int N, bool psi_sums) {
  return kRedFixed + (psi_sums ? 4 * R * P : 0) + 4 * R * N;
}

// Slots of chunk_out_tc in lay.red (floats): per-row partial sums of the two column halves (the
// norm's sum of squares, then its mean(dyn w y)), per-warp D partials, then the rank column sums
// of the 4 row tiles (4 R P), reused for d zeta, d phi and d norm_weight in turn.
enum OutRed : int { kOutSs = 0, kOutXr = 128, kOutDd = 256, kOutFixed = 272 };
inline int out_red_floats(int R, int P) { return kOutFixed + 4 * R * P; }

// psi_sums: chunk_grad's d psi partials (grad.mimo_v asked for).
inline TcSmem tc_layout(TcKernel kind, int N, int P, int R, int NA, int rows,
                        bool psi_sums = true) {
  TcSmem l{};
  l.rows = rows, l.C = rows / R;
  l.qp = N + 8, l.vp = P + 8, l.ap = rows + 8;
  int o = 0;
  auto take = [&](bool want, int bytes) {
    if (!want) return -1;
    const int at = o;
    o += tc_up16(bytes);
    return at;
  };
  const bool grad = kind == kTcGrad, out_y = kind == kTcOutY, out = kind == kTcOut || out_y;
  l.q = take(true, rows * l.qp * 2);  // chunk_state loads it for the tile record
  l.k = take(!out_y, rows * l.qp * 2);
  if (out) {  // chunk_out (bwd_tc_out.cuh): the operands of y, the raw v of the D skip, e dy
    l.s = take(!out_y, P * l.qp * 2);
    l.am = take(!out_y, rows * l.ap * 2);
    l.v = take(!out_y, rows * l.vp * 2);
    l.vr = take(true, l.C * l.vp * 2);
    l.dy = take(true, rows * l.vp * 2);
    l.vf = -1;
  } else {
    l.v = take(true, rows * l.vp * 2);
    l.dy = take(grad, rows * l.vp * 2);
    l.vf = take(!grad, rows * l.vp * 2);
    l.s = take(grad, P * l.qp * 2);
    l.am = take(grad, 2 * rows * l.ap * 2);
    l.vr = -1;
  }
  const int th_bytes = l.C * (NA > 0 ? NA : 1) * 4;
  l.th = take(!out, th_bytes);  // chunk_out has no rope adjoint
  l.dth = grad && th_bytes <= rows * l.ap * 2 ? l.am : take(grad, th_bytes);
  l.scal = take(true, kScalarArrays * kMaxRows * 4);
  l.par = take(true, (3 * R * P + P) * 4);
  l.red = take(true, 4 * (grad  ? grad_red_floats(R, P, N, psi_sums)
                           : out ? out_red_floats(R, P)
                                 : 2 * kThreads));
  l.bias = take(kind == kTcState, 2 * R * N * 4);  // the loader's biases (chunk_state only)
  l.bytes = o;
  return l;
}

// One k-step of 16 of a 16-row output tile on the tensor cores: the A fragment at (i0, k0) of
// a row-major [i][k] operand (kATrans: stored [k][i]), then for each 16-column group u < kNT
// starting at j0(u) the B fragments of a [j][k] operand (kBKn: [k][j]) and two mma.sync into
// c[2 u], c[2 u + 1]; groups whose bit is clear in `live` are skipped.
template <bool kATrans, bool kBKn, int kNT, typename FJ>
__device__ __forceinline__ void tc_kstep(float (&c)[2 * kNT][4], const bf16* A, int ap, int i0,
                                         const bf16* B, int bp, FJ j0, int k0, unsigned live,
                                         int lane) {
  uint32_t a[4];
  if constexpr (kATrans)
    load_a_trans(a, A, ap, i0, k0, lane);
  else
    load_a(a, A, ap, i0, k0, lane);
#pragma unroll
  for (int u = 0; u < kNT; ++u) {
    if (!((live >> u) & 1u)) continue;
    uint32_t b[4];
    if constexpr (kBKn)
      load_b_kn(b, B, bp, j0(u), k0, lane);
    else
      load_b_nk(b, B, bp, j0(u), k0, lane);
    mma_bf16(c[2 * u], a, b[0], b[1]);
    mma_bf16(c[2 * u + 1], a, b[2], b[3]);
  }
}

// C(i, j) = sum_k A(i, k) B(k, j) for i < M, j < Nc on the tensor cores, one 16 x (16 kNT)
// output tile per warp at a time (kNT = 2 halves the A fragment loads where Nc is a multiple of
// 32). A is row-major [i][k] (kATrans: stored [k][i]); B is stored [j][k] (kBKn: [k][j]); both
// bf16 with 16-byte aligned rows, zero past their extents up to the next multiple of 16.
// krange(i0, j0, &kb, &ke) gives the k extent of tile (i0, j0) (multiples of 16); kb >= ke skips
// the tile (no epilogue). epi(i, j, acc0, acc1) stores columns j (even) and j + 1 of row i (Nc
// is even); each (i, j) has one owner, and its k tiles are accumulated in a fixed order
// (deterministic).
template <bool kATrans, bool kBKn, int kNT = 1, typename FK, typename FE>
__device__ __forceinline__ void tc_gemm(int M, int Nc, const bf16* A, int ap, const bf16* B, int bp,
                                        FK krange, FE epi, int warp, int lane) {
  constexpr int kWarps = kThreads / 32, kTw = 16 * kNT;
  const int tm = (M + 15) / 16, tn = (Nc + kTw - 1) / kTw;
  const int g = lane >> 2, tq = lane & 3;
  __syncwarp();
  for (int t = warp; t < tm * tn; t += kWarps) {
    const int i0 = (t / tn) * 16, j0 = (t % tn) * kTw;
    int kb = 0, ke = 0;
    krange(i0, j0, &kb, &ke);
    if (kb >= ke) continue;
    float c[2 * kNT][4];
#pragma unroll
    for (int j = 0; j < 2 * kNT; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
    for (int k0 = kb; k0 < ke; k0 += 16)
      tc_kstep<kATrans, kBKn, kNT>(
          c, A, ap, i0, B, bp, [j0](int u) { return j0 + 16 * u; }, k0, ~0u, lane);
#pragma unroll
    for (int j = 0; j < 2 * kNT; ++j)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int i = i0 + g + hr * 8, col = j0 + j * 8 + 2 * tq;
        if (i < M && col < Nc) epi(i, col, c[j][2 * hr], c[j][2 * hr + 1]);
      }
  }
}

// v minus its bf16 rounding: the low part of a two-term bf16 split (v = hi + lo to ~2^-17).
__device__ __forceinline__ float bf16_residual(float v) {
  return v - __bfloat162float(__float2bfloat16_rn(v));
}

// A (P, N) fp32 state (contiguous, 16-byte aligned) as a bf16 operand tile with pitch qp
// (kResidual: the low part of its two-term split, bf16_residual).
template <bool kResidual = false>
__device__ __forceinline__ void stage_state_bf16(const float* state, bf16* dst, int P, int N,
                                                 int qp, int tid) {
  const int n4 = N / 4, ln4 = log2_pow2(n4);  // N a power of two on the tensor-core path
  const int total = P * n4;
  // Four iterations' loads issued before their stores: through generic pointers the compiler
  // may not move a global load above a shared store, and one load at a time in flight left
  // the staging latency-bound (ncu: its packs waited on the loads).
  for (int i0 = tid; i0 < total; i0 += 4 * kThreads) {
    float4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = i0 + u * kThreads;
      if (i < total)
        v[u] = *reinterpret_cast<const float4*>(state + static_cast<int64_t>(i >> ln4) * N +
                                                (i & (n4 - 1)) * 4);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = i0 + u * kThreads;
      if (i >= total) break;
      float4 w = v[u];
      if constexpr (kResidual)
        w = make_float4(bf16_residual(w.x), bf16_residual(w.y), bf16_residual(w.z),
                        bf16_residual(w.w));
      uint2 pk;
      pk.x = pack_bf16(w.x, w.y);
      pk.y = pack_bf16(w.z, w.w);
      *reinterpret_cast<uint2*>(dst + (i >> ln4) * qp + (i & (n4 - 1)) * 4) = pk;
    }
  }
}

// Chunk loader of the tensor-core kernels: the scalars of load_chunk (cs, e, w, fw, gamma,
// lambda, dt), the wrapped angle of every (token, rope pair) in th, then rotated biased q and k
// rows and v * psi rows rounded to bf16 (rows past the chunk zero; v_mode kVPsiAndFw also
// v * psi * fw into VF, chunk_state's operand). psi must already be in shared memory (par).
// Ends with a barrier.
enum TcVMode { kVNone, kVPsi, kVPsiAndFw };

__device__ void tc_load_chunk(const BwdParams& bp, const Chunk& ck, const TcSmem& lay,
                              unsigned char* sm, bool want_q, TcVMode v_mode, int tid) {
  const CoreParams& p = bp.p;
  const int N = p.N, P = p.P, R = p.R, NA = p.NA, m = ck.m, mr = ck.mr, h = ck.h, b = ck.b;
  const int l0 = ck.begin + ck.t0, rows = lay.rows, half = N / 2;
  float* sc = reinterpret_cast<float*>(sm + lay.scal);
  float* cs = sc + kCs * kMaxRows;
  float* ex = sc + kE * kMaxRows;
  float* w = sc + kW * kMaxRows;
  float* fw = sc + kFw * kMaxRows;
  const float* psi = reinterpret_cast<const float*>(sm + lay.par);
  float* th = reinterpret_cast<float*>(sm + lay.th);
  float* qb = reinterpret_cast<float*>(sm + lay.bias);
  float* kb = qb + R * N;
  bf16* Q = reinterpret_cast<bf16*>(sm + lay.q);
  bf16* K = reinterpret_cast<bf16*>(sm + lay.k);
  bf16* V = reinterpret_cast<bf16*>(sm + lay.v);
  bf16* VF = v_mode == kVPsiAndFw ? reinterpret_cast<bf16*>(sm + lay.vf) : nullptr;
  load_chunk_inputs(bp, ck, sc, th, qb, kb, tid);
  // The raw q, k, v tiles, 16 bytes per load (the tensor-core path has 16-byte aligned
  // contiguous rows), issued now so their latency overlaps the scalar and angle walks below;
  // slot s of a thread is 8 columns of one row (qk_slot / v_slot), at most kSlots per tensor.
  // Interleaved pairs lie inside one group of 8 columns; halved pairs join slot 2j (columns
  // c*8..) and 2j + 1 (columns N/2 + c*8..).
  // N, P and R are powers of two here: slots, tokens and ranks by shifts.
  constexpr int kSlots = kMaxRows * 128 / 8 / kThreads;  // >= rows * N / 8 / kThreads
  const bool inter = p.interleaved;
  const int c_per = inter ? N / 8 : N / 16, lc = log2_pow2(c_per);
  const int p8 = P / 8, lp8 = log2_pow2(p8), lr = log2_pow2(R);
  auto qk_slot = [&](int s, int* row, int* n0) {
    const int j = inter ? s : s >> 1;
    const int i = tid + j * kThreads;
    *row = i >> lc;
    const int c = i & (c_per - 1);
    *n0 = c * 8 + (!inter && (s & 1) ? half : 0);
    return i < rows * c_per;
  };
  auto v_slot = [&](int s, int* row, int* x) {
    const int i = tid + s * kThreads;
    *row = i >> lp8, *x = (i & (p8 - 1)) * 8;
    return i < rows * p8;
  };
  // The raw v rows go to the V tile by cp.async (zero past the chunk), converted in place by
  // the thread that copied them, after the walks: registers stay free for the walks.
  uint4 kraw[kSlots], qraw[kSlots];
  const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int sl = 0; sl < kSlots; ++sl) {
    int row, n0, x;
    kraw[sl] = qraw[sl] = zero4;
    if (qk_slot(sl, &row, &n0) && row < mr) {
      const int t = row >> lr, r = row & (R - 1);
      kraw[sl] = __ldg(reinterpret_cast<const uint4*>(static_cast<const bf16*>(p.k.data) +
                                                      qk_off(p.k, b, l0 + t, r, ck.g, n0)));
      if (want_q)
        qraw[sl] = __ldg(reinterpret_cast<const uint4*>(static_cast<const bf16*>(p.q.data) +
                                                        qk_off(p.q, b, l0 + t, r, ck.g, n0)));
    }
    if (v_mode != kVNone && v_slot(sl, &row, &x)) {
      const bf16* v0 = static_cast<const bf16*>(p.v.data) + b * p.v.stride[0] + h * p.v.stride[2];
      cp_async16(V + row * lay.vp + x,
                 row < mr ? v0 + static_cast<int64_t>(l0 + (row >> lr)) * p.v.stride[1] + x : v0,
                 row < mr);
    }
  }
  __syncthreads();
  chunk_cumsum_and_increments(sc, th, m, NA, tid);
  __syncthreads();
  chunk_angles_and_decays(bp, ck, h, NA, m, th, cs, w, ex, fw,
                          reinterpret_cast<double*>(sm + lay.red), kThreads, tid);  // 2 kThreads floats
  __syncthreads();
  // q and k rows biased and rotated in fp32 from the raw bf16 inputs, rounded once (rows past
  // the chunk zero); v * psi (* fw) likewise.
  auto biased = [&](const uint4& u, int r, int n0, const float* bias, float(&f)[8]) {
    bf16x8_to_float(u, f);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] += bias[r * N + n0 + e];
  };
  auto st8 = [&](bf16* dst, int row, int n0, const float(&f)[8]) {
    *reinterpret_cast<uint4*>(dst + row * lay.qp + n0) = float8_to_bf16x8(f);
  };
  auto rot = [](float& xa, float& xb, float cn, float sn) {
    const float a = xa, bb = xb;
    xa = a * cn - bb * sn, xb = a * sn + bb * cn;
  };
  const float zero8[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (inter) {
#pragma unroll
    for (int sl = 0; sl < kSlots; ++sl) {
      int row, n0;
      if (!qk_slot(sl, &row, &n0)) continue;
      const int t = row >> lr, r = row & (R - 1);
      if (row >= mr) {
        st8(K, row, n0, zero8);
        if (want_q) st8(Q, row, n0, zero8);
        continue;
      }
      float kf[8], qf[8];
      biased(kraw[sl], r, n0, kb, kf);
      if (want_q) biased(qraw[sl], r, n0, qb, qf);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int a = n0 / 2 + e;
        if (a < NA) {
          float sn, cn;
          __sincosf(th[t * NA + a], &sn, &cn);
          rot(kf[2 * e], kf[2 * e + 1], cn, sn);
          if (want_q) rot(qf[2 * e], qf[2 * e + 1], cn, sn);
        }
      }
      st8(K, row, n0, kf);
      if (want_q) st8(Q, row, n0, qf);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kSlots / 2; ++j) {
      int row, n0;
      if (!qk_slot(2 * j, &row, &n0)) continue;
      const int t = row >> lr, r = row & (R - 1);
      if (row >= mr) {
        st8(K, row, n0, zero8), st8(K, row, half + n0, zero8);
        if (want_q) st8(Q, row, n0, zero8), st8(Q, row, half + n0, zero8);
        continue;
      }
      float k0[8], k1[8], q0[8], q1[8];
      biased(kraw[2 * j], r, n0, kb, k0);
      biased(kraw[2 * j + 1], r, half + n0, kb, k1);
      if (want_q) biased(qraw[2 * j], r, n0, qb, q0), biased(qraw[2 * j + 1], r, half + n0, qb, q1);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int a = n0 + e;
        if (a < NA) {
          float sn, cn;
          __sincosf(th[t * NA + a], &sn, &cn);
          rot(k0[e], k1[e], cn, sn);
          if (want_q) rot(q0[e], q1[e], cn, sn);
        }
      }
      st8(K, row, n0, k0), st8(K, row, half + n0, k1);
      if (want_q) st8(Q, row, n0, q0), st8(Q, row, half + n0, q1);
    }
  }
  if (v_mode != kVNone) {
    cp_async_wait_all();  // this thread's v copies
#pragma unroll
    for (int sl = 0; sl < kSlots; ++sl) {
      int row, x;
      if (!v_slot(sl, &row, &x)) continue;
      float f[8], g[8];
      if (row < mr) {
        const int t = row >> lr, r = row & (R - 1);
        bf16x8_to_float(*reinterpret_cast<const uint4*>(V + row * lay.vp + x), f);
        const float scale = VF ? fw[t] : 1.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          g[e] = f[e] * (psi[r * P + x + e] * scale);
          f[e] *= psi[r * P + x + e];
        }
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) f[e] = g[e] = 0.f;
      }
      *reinterpret_cast<uint4*>(V + row * lay.vp + x) = float8_to_bf16x8(f);
      if (VF) *reinterpret_cast<uint4*>(VF + row * lay.vp + x) = float8_to_bf16x8(g);
    }
  }
  __syncthreads();
}

// cp.async of `rows` rows of the chunk's raw bf16 v (contiguous, 16-byte aligned on the
// tensor-core path) into shared memory at byte offset `dst`, pitch lay.vp: row i gets token
// i >> lr, rows from `valid` on zero.
__device__ __forceinline__ void tc_copy_v_rows(const BwdParams& bp, const Chunk& ck,
                                               const TcSmem& lay, unsigned char* sm, int dst,
                                               int rows, int lr, int valid, int tid) {
  const DTensor& v = bp.p.v;
  const int p8 = bp.p.P / 8, lp8 = log2_pow2(p8);
  const bf16* v0 = static_cast<const bf16*>(v.data) + ck.b * v.stride[0] +
                   static_cast<int64_t>(ck.begin + ck.t0) * v.stride[1] + ck.h * v.stride[2];
  bf16* D = reinterpret_cast<bf16*>(sm + dst);
  for (int i = tid; i < rows * p8; i += kThreads) {
    const int row = i >> lp8, c = (i & (p8 - 1)) * 8;
    const bool ok = row < valid;
    cp_async16(D + row * lay.vp + c, ok ? v0 + (row >> lr) * v.stride[1] + c : v0, ok);
  }
}

// Without the PsiV cache (TileRecord::v < 0) the record has no v psi tile; its readers build it
// from the raw v as the loader does, row t R + r of lay.v = bf16(float(v_t) * psi_r), rows past
// the chunk zero. tc_fetch_v_rows copies v_t into every row t R + r (cp.async, with the record's
// copies; v has 16-byte aligned contiguous rows on the tensor-core path): the tile itself where
// psi is absent (1: bf16(v * 1) = v). Where psi is given (tc_v_rows_need_psi), tc_scale_v_rows
// scales it in place after the barrier that publishes the copies and psi, and the caller
// synchronizes again. (Measured 2026-11-30 against scaling by each thread's own copies with psi
// read into registers from global memory, no extra barrier: that was 18 % slower at `megacpp`.)
__device__ __forceinline__ void tc_fetch_v_rows(const BwdParams& bp, const Chunk& ck,
                                                const TcSmem& lay, unsigned char* sm, int tid) {
  tc_copy_v_rows(bp, ck, lay, sm, lay.v, lay.rows, log2_pow2(bp.p.R), ck.mr, tid);
}
__device__ __forceinline__ bool tc_v_rows_need_psi(const BwdParams& bp) {
  return bp.tr.v < 0 && bp.p.mimo_v.defined();
}
// psi: (R, P) in shared memory. Rows past the chunk hold zeros and are left so.
__device__ __forceinline__ void tc_scale_v_rows(const BwdParams& bp, const TcSmem& lay,
                                                unsigned char* sm, const float* psi, int mr,
                                                int tid) {
  const int P = bp.p.P, p8 = P / 8, lp8 = log2_pow2(p8), R = bp.p.R;
  bf16* V = reinterpret_cast<bf16*>(sm + lay.v);
  for (int i = tid; i < mr * p8; i += kThreads) {
    const int row = i >> lp8, c = (i & (p8 - 1)) * 8;
    uint4* at = reinterpret_cast<uint4*>(V + row * lay.vp + c);
    const float* ps = psi + (row & (R - 1)) * P + c;
    float f[8];
    bf16x8_to_float(*at, f);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] *= ps[e];
    *at = float8_to_bf16x8(f);
  }
}

// The chunk's tile record (Workspace::tiles, TileRecord): kFetch false stores what
// tc_load_chunk(want_q, kVPsi) left in shared memory (after its barrier); kFetch true issues
// cp.async copies that put the same bytes back in place of running the loader again (v psi
// without the PsiV cache: the raw v rows, tc_fetch_v_rows). The caller then waits
// (cp_async_wait_all) and synchronizes before reading them, and where tc_v_rows_need_psi
// scales the v rows (tc_scale_v_rows) and synchronizes again.
// kQOnly (chunk_out from a saved y): the q tile and the scalar arrays only.
template <bool kFetch, bool kQOnly = false>
__device__ __forceinline__ void tc_chunk_tiles(const BwdParams& bp, const Chunk& ck,
                                               const TcSmem& lay, unsigned char* sm, int tid) {
  const int N = bp.p.N, P = bp.p.P, rows = lay.rows;
  const TileRecord& tr = bp.tr;
  unsigned char* rec = bp.ws.tiles + (static_cast<int64_t>(ck.cid) * bp.p.H + ck.h) * tr.bytes;
  auto move16 = [&](unsigned char* s, unsigned char* g) {
    if constexpr (kFetch)
      cp_async16(s, g);
    else
      *reinterpret_cast<uint4*>(g) = *reinterpret_cast<const uint4*>(s);
  };
  // bf16 tiles: dense rows in the record, pitch `pitch` elements in shared memory (N and P are
  // powers of two here).
  auto tile = [&](int s_off, int g_off, int cols, int pitch) {
    const int c8 = cols / 8, lc = log2_pow2(c8);
    for (int i = tid; i < rows * c8; i += kThreads) {
      const int row = i >> lc, c = i & (c8 - 1);
      move16(sm + s_off + (row * pitch + c * 8) * 2, rec + g_off + i * 16);
    }
  };
  tile(lay.q, tr.q, N, lay.qp);
  if constexpr (!kQOnly) {
    tile(lay.k, tr.k, N, lay.qp);
    if (tr.v >= 0)
      tile(lay.v, tr.v, P, lay.vp);  // the PsiV cache
    else if constexpr (kFetch)
      tc_fetch_v_rows(bp, ck, lay, sm, tid);  // then tc_scale_v_rows where psi is given
  }
  // fp32 arrays, dense in both places: the wrapped angles and the loader's scalar arrays.
  auto flat = [&](int s_off, int g_off, int floats) {
    for (int i = tid; i < floats / 4; i += kThreads)
      move16(sm + s_off + i * 16, rec + g_off + i * 16);
    for (int i = (floats & ~3) + tid; i < floats; i += kThreads) {
      unsigned char* s = sm + s_off + i * 4;
      unsigned char* g = rec + g_off + i * 4;
      if constexpr (kFetch)
        cp_async4(s, g);
      else
        *reinterpret_cast<float*>(g) = *reinterpret_cast<const float*>(s);
    }
  };
  if (!kQOnly && lay.th >= 0) flat(lay.th, tr.th, lay.C * bp.p.NA);  // chunk_out reads no angles
  flat(lay.scal, tr.sc, kLoaderScalars * kMaxRows);
}

// cp.async of the chunk's raw bf16 v rows into the (C, P) tile lay.vr, pitch lay.vp; rows past
// the chunk zero. The caller waits.
__device__ __forceinline__ void tc_fetch_raw_v(const BwdParams& bp, const Chunk& ck,
                                               const TcSmem& lay, unsigned char* sm, int tid) {
  tc_copy_v_rows(bp, ck, lay, sm, lay.vr, lay.C, 0, ck.m, tid);
}

// grid (chunks, H): bwd_chunk_state_kernel on the tensor cores: the chunk's state increment
// sum_j (fw_j v_j psi)^T k_j (P, N, fp32 accumulation of bf16 operands) and its decay.
__global__ void __launch_bounds__(kThreads, 3) bwd_chunk_state_tc_kernel(BwdParams bp, TcSmem lay) {
  M3B_DYNAMIC_SMEM_TC(sm);
  Chunk ck;
  if (!find_chunk(bp, blockIdx.x, blockIdx.y, &ck)) return;
  const CoreParams& p = bp.p;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int N = p.N, P = p.P;
  const int kr = (ck.mr + 15) & ~15;
  float* par = reinterpret_cast<float*>(sm + lay.par);
  load_head_psi(p, ck.h, par, tid, kThreads);  // the loader's v psi
  __syncthreads();
  tc_load_chunk(bp, ck, lay, sm, true, kVPsiAndFw, tid);
  tc_chunk_tiles<false>(bp, ck, lay, sm, tid);  // for chunk_out_tc and chunk_grad_tc
  const bf16* K = reinterpret_cast<const bf16*>(sm + lay.k);
  const bf16* V = reinterpret_cast<const bf16*>(sm + lay.vf);
  const int64_t cell = static_cast<int64_t>(ck.cid) * p.H + ck.h;
  float* out = bp.ws.s_prev + cell * P * N;
  tc_gemm<true, true, 2>(
      P, N, V, lay.vp, K, lay.qp, [kr](int, int, int* kb, int* ke) { *kb = 0, *ke = kr; },
      [&](int x, int n, float a0, float a1) {
        *reinterpret_cast<float2*>(out + static_cast<int64_t>(x) * N + n) = make_float2(a0, a1);
      },
      warp, lane);
  if (tid == 0)
    bp.ws.decay[cell] = reinterpret_cast<const float*>(sm + lay.scal)[kE * kMaxRows + ck.m - 1];
}

}  // namespace mamba3::cuda::bwd
