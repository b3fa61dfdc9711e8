// Shared pieces of the chunked backward (DESIGN.md §2.3, §2.5): the argument struct of every
// backward kernel, the workspace they communicate through, the shared-memory layout of a chunk,
// the chunk loader (per-token scalars, rope angles, rotated q/k rows, v * psi rows) and a small
// register-tiled fp32 block GEMM on shared-memory operands.
//
// Math names follow DESIGN.md (q = C, k = B, v = x). A chunk holds `rows` rows (C = rows / R
// tokens, row t*R + r, DESIGN §2.5); chunk ids are flat over every sequence of the call
// (chunk_off[s] .. chunk_off[s+1] belong to sequence s) so packed sequences need no host copy.
//
// Determinism: every value is produced by one thread of one block with loops of fixed order,
// and cross-block sums go through the workspace and are reduced in a fixed order by a later
// kernel. There are no atomics anywhere in the backward.
#pragma once

#include <cstdint>

#include "cuda/common/layer_io.cuh"
#include "cuda/common/tile_record.cuh"

namespace mamba3::cuda::bwd {

inline constexpr int kThreads = 256;  // threads of the chunk and scan kernels
inline constexpr int kMaxRows = 64;   // largest chunk (rows); smaller when shared memory is short
inline constexpr int kTileX = 32;     // rows of a (P, N) state staged in shared memory at a time
inline constexpr int kScalarArrays = 12;
inline constexpr int kScanBatch = 8;  // chunks whose loads a state-scan thread keeps in flight  // per-token / per-row scalar arrays of kMaxRows floats

// Scalar arrays of a chunk in shared memory (index * kMaxRows floats from BwdSmem::scal): the
// loader's (kCs .. kDt, cuda/common/tile_record.cuh), then the backward's own.
enum ScalarArray {
  kDcs = kLoaderScalars,  // gradient of cs
  kDw,                    // gradient of w
  kDgam,                  // gradient of gamma
  kXr,                    // per-row scratch (row sums)
  kRstd,                  // per-row rstd of the fused norm
};
static_assert(kRstd + 1 == kScalarArrays, "scalar arrays");
static_assert(kRecordRows == kMaxRows, "tile records hold 64-row chunks");

// Workspace (one stream-ordered allocation per call), all fp32 unless noted. ncu = upper bound
// of the number of chunks of the call; L_tot = B * L token slots (token (b, l) is b * L + l).
struct Workspace {
  int32_t* chunk_off = nullptr;  // (S + 1): first flat chunk id of each sequence
  double* theta = nullptr;       // (ncu, H, NA): per-chunk angle increments, then chunk-start angles
  float* decay = nullptr;        // (ncu, H): exp(cs_last) of each chunk
  float* s_prev = nullptr;       // (ncu, H, P, N): chunk state increments, then chunk-start states
  float* ds_end = nullptr;       // (ncu, H, P, N): dS increments, then state cotangents at chunk end
  float* dy = nullptr;           // (L_tot, H, R, P): cotangent of the pre-gate y
  float* dq = nullptr;           // (L_tot, H, R, N) per-head dq (null when H == G or no grad.q)
  float* dk = nullptr;           // (L_tot, H, R, N) per-head dk (likewise)
  float* tok = nullptr;          // (2, H, L_tot): d gamma, d w per token
  float* dth = nullptr;          // (L_tot, H, NA): rotation gradient of each token's angle
  float* dthc = nullptr;         // (ncu, H, NA): per-chunk sums of dth, then the carry at chunk end
  float* bnd = nullptr;          // (ncu, H, NA): rotation derivative at each chunk's end boundary
                                 // from the fp32 states (bwd_angle_boundary_kernel)
  float* par = nullptr;          // (ncu, H, F): per-chunk partial parameter gradients
  float* ds0 = nullptr;          // (S, H, P, N): cotangent of the effective initial state
  float* initp = nullptr;        // (S, H, R*P + 1): initial-pair parts of d psi, and d sg0
  unsigned char* tiles = nullptr;  // (ncu, H) records of TileRecord::bytes (tensor-core path):
                                   // the chunk loader's output, written once by chunk_state_tc
                                   // and copied back by chunk_out_tc and chunk_grad_tc; with
                                   // the forward's saved buffer, theta is not allocated and
                                   // decay, s_prev and tiles point into that buffer
  const float* y = nullptr;        // (ncu, H, 64, P): the forward's y before the output stage
                                   // (saved buffer only; chunk_out reads it instead of
                                   // recomputing y)
};

// Fields of one per-chunk partial record (Workspace::par), offsets in floats.
struct ParFields {
  int zeta, phi, w, psi, qb, kb, d, count;
};
__host__ __device__ inline ParFields par_fields(int R, int P, int N) {
  ParFields f;
  f.zeta = 0;
  f.phi = R * P;
  f.w = 2 * R * P;
  f.psi = 2 * R * P + P;
  f.qb = 3 * R * P + P;
  f.kb = f.qb + R * N;
  f.d = f.kb + R * N;
  f.count = f.d + 1;
  return f;
}

struct BwdParams {
  CoreParams p;  // inputs, dimensions and flags (out / final states unused)
  DTensor d_out;                          // shaped like out
  DTensor df_angle, df_ssm, df_k, df_v;   // final-state cotangents (absent: zero)
  DTensor g_q, g_k, g_v, g_adt, g_dt, g_trap, g_qb, g_kb, g_angles, g_d, g_z, g_psi, g_zeta,
      g_phi, g_w;                         // gradients (absent: not requested)
  DTensor gi_angle, gi_ssm, gi_k, gi_v;   // initial-state gradients (absent: not requested)
  Workspace ws;
  int rows = kMaxRows, C = kMaxRows;  // rows per chunk, tokens per chunk (rows / R)
  int64_t L_tot = 0;
  ParFields pf;
  TileRecord tr{};  // layout of Workspace::tiles (tensor-core path)
  // The forward's saved buffer (null: none): its header, checked against want_hdr by
  // bwd_plan_kernel before any kernel reads the records.
  const int32_t* saved_hdr = nullptr;
  int32_t want_hdr[kSavedHeaderInts] = {};
};

// Shared-memory layout of the chunk kernels; offsets in floats (-1: not allocated). Pitches pad
// rows by one word against bank conflicts.
struct BwdSmem {
  int rows, C, qn, vp, ap, sp;
  int q, k, v, dy, ra, da, st, tl, th, dth, go, z, scal, par, red, total_floats;
};

enum SmemPart : unsigned {
  kPartQ = 1, kPartK = 2, kPartV = 4, kPartDY = 8, kPartRA = 16, kPartDA = 32, kPartST = 64,
  kPartTL = 128, kPartTH = 256, kPartDTH = 512, kPartGO = 1024, kPartZ = 2048,
};

inline BwdSmem bwd_smem_layout(int N, int P, int R, int NA, int rows, unsigned parts) {
  BwdSmem m{};
  m.rows = rows, m.C = rows / R;
  m.qn = N + 1, m.vp = P + 1, m.ap = rows + 1, m.sp = (N > P ? N : P) + 1;
  int o = 0;
  auto take = [&](unsigned part, int floats) {
    if (!(parts & part)) return -1;
    const int at = o;
    o += floats;
    return at;
  };
  m.q = take(kPartQ, rows * m.qn);
  m.k = take(kPartK, rows * m.qn);
  m.v = take(kPartV, rows * m.vp);
  m.dy = take(kPartDY, rows * m.vp);
  m.ra = take(kPartRA, rows * m.ap);
  m.da = take(kPartDA, rows * m.ap);
  // The staging buffer also holds the time-level (C, C) matrix of the mask gradients.
  const int st = rows * m.sp > m.C * m.C ? rows * m.sp : m.C * m.C;
  m.st = take(kPartST, st);
  m.tl = take(kPartTL, kTileX * m.qn);
  m.th = take(kPartTH, m.C * (NA > 0 ? NA : 1));
  m.dth = take(kPartDTH, m.C * (NA > 0 ? NA : 1));
  m.go = take(kPartGO, rows * m.vp);  // cotangent of out, per row (per token when reduced)
  m.z = take(kPartZ, rows * m.vp);
  m.scal = o, o += kScalarArrays * kMaxRows;
  m.par = o, o += 3 * R * P + P;  // psi, zeta, phi (R, P) and the norm weight (P)
  o = (o + 1) & ~1;  // 8-byte aligned: the angle walk's float64 partials (load_chunk)
  m.red = o, o += kThreads;  // block reductions
  m.total_floats = o;
  return m;
}

inline size_t smem_bytes(const BwdSmem& m) { return sizeof(float) * static_cast<size_t>(m.total_floats); }

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ bool is_pow2(int x) { return x > 0 && (x & (x - 1)) == 0; }
// log2 of a power of two.
__host__ __device__ __forceinline__ int log2_pow2(int x) {
#ifdef __CUDA_ARCH__
  return __ffs(x) - 1;
#else
  int l = 0;
  while ((1 << l) < x) ++l;
  return l;
#endif
}

// ---------------------------------------------------------------------------------------------
// Sequences and chunks

struct SeqInfo {
  int b, begin, n;  // batch row, first token (within the row), length
};

__device__ __forceinline__ SeqInfo seq_info(const CoreParams& p, int s) {
  SeqInfo q;
  if (p.cu_seqlens) {
    q.b = 0;
    q.begin = p.cu_seqlens[s * p.cu_stride];
    q.n = p.cu_seqlens[(s + 1) * p.cu_stride] - q.begin;
  } else {
    q.b = s, q.begin = 0, q.n = p.L;
  }
  return q;
}

struct Chunk {
  int s, h, g, b, begin, n;  // sequence, head, group, batch row, sequence start, sequence length
  int cid, c, t0, m, mr;     // flat chunk id, chunk index in the sequence, first token, tokens, rows
  bool last;                 // holds the last token of the sequence
  int64_t l_abs0;            // token slot (b * L + l) of the chunk's first token
};

// Chunk `cid` of head h; false (for the whole block) past the last chunk of the call.
__device__ __forceinline__ bool find_chunk(const BwdParams& bp, int cid, int h, Chunk* ck) {
  const CoreParams& p = bp.p;
  int lo, first;        // the chunk's sequence and that sequence's first chunk id
  if (!p.cu_seqlens) {  // S sequences of L tokens: chunk_off[s] = s ceil(L / C), no loads
    const int per = (p.L + bp.C - 1) / bp.C;
    if (cid >= p.S * per) return false;
    lo = cid / per, first = lo * per;
  } else {
    const int32_t* off = bp.ws.chunk_off;
    if (cid >= off[p.S]) return false;
    lo = 0;
    int hi = p.S - 1;  // the largest s with off[s] <= cid (a non-empty sequence)
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (off[mid] <= cid)
        lo = mid;
      else
        hi = mid - 1;
    }
    first = off[lo];
  }
  const SeqInfo q = seq_info(p, lo);
  ck->s = lo, ck->h = h, ck->g = h / p.hpg, ck->b = q.b, ck->begin = q.begin, ck->n = q.n;
  ck->cid = cid, ck->c = cid - first, ck->t0 = ck->c * bp.C;
  ck->m = imin(bp.C, q.n - ck->t0), ck->mr = ck->m * p.R;
  ck->last = ck->t0 + ck->m == q.n;
  ck->l_abs0 = static_cast<int64_t>(q.b) * p.L + q.begin + ck->t0;
  return true;
}

// Offset of element i of a (S, H, X) per-sequence tensor (initial / final angle and v).
__device__ __forceinline__ int64_t shx_off(const DTensor& t, int s, int h, int i) {
  return s * t.stride[0] + h * t.stride[1] + i * t.stride[2];
}

// Per-token inputs, token l of batch row b.
__device__ __forceinline__ float in_bhl(const DTensor& t, int b, int h, int l) {
  return dload_ro(t, b * t.stride[0] + h * t.stride[1] + static_cast<int64_t>(l) * t.stride[2]);
}
__device__ __forceinline__ float angle_at(const CoreParams& p, int b, int l, int h, int i) {
  return dload_ro(p.angles, b * p.angles.stride[0] + static_cast<int64_t>(l) * p.angles.stride[1] +
                                h * p.angles.stride[2] + i * p.angles.stride[3]);
}
// The angle increment pi * tanh(angles) * dt, rounded as the fp32 (SIMT) forward rounds it. The
// tensor-core forward takes its tanh from tanh_abs_err (params.cuh; within ~2^-22 of tanhf), so
// where this loader recomputes that path's angles (no saved tile records) they differ from the
// forward's by that much; with the saved records the backward reads the forward's own.
__device__ __forceinline__ double angle_inc(float angle, float dt) {
  return static_cast<double>(static_cast<float>(kPiD) * tanhf(angle) * dt);
}

// Members (ia, ib) of rope pair i.
__device__ __forceinline__ void pair_members(bool interleaved, int N, int i, int* ia, int* ib) {
  if (interleaved) *ia = 2 * i, *ib = 2 * i + 1;
  else *ia = i, *ib = i + N / 2;
}

// ---------------------------------------------------------------------------------------------
// Block GEMM: out(i, j) = sum_k a(i, k) b(k, j) for i < M, j < Nc, each thread a TM x TN
// micro-tile of rows {it + u*tm} and columns {jt + w*tn} (strided, so a warp reads consecutive
// words of b and broadcasts a), accumulated over k in order; epi(i, j, acc) stores. Every output
// has one owner, so the epilogue may read and write out(i, j) in place.
template <int TM, int TN, typename FA, typename FB, typename FE>
__device__ __forceinline__ void block_gemm(int M, int Nc, int K, FA a, FB b, FE epi, int tid) {
  const int tm = (M + TM - 1) / TM, tn = (Nc + TN - 1) / TN;
  for (int t = tid; t < tm * tn; t += kThreads) {
    const int it = t / tn, jt = t % tn;
    int ri[TM], cj[TN];
#pragma unroll
    for (int u = 0; u < TM; ++u) ri[u] = imin(it + u * tm, M - 1);
#pragma unroll
    for (int w = 0; w < TN; ++w) cj[w] = imin(jt + w * tn, Nc - 1);
    float acc[TM][TN];
#pragma unroll
    for (int u = 0; u < TM; ++u)
#pragma unroll
      for (int w = 0; w < TN; ++w) acc[u][w] = 0.f;
    for (int k = 0; k < K; ++k) {
      float av[TM], bv[TN];
#pragma unroll
      for (int u = 0; u < TM; ++u) av[u] = a(ri[u], k);
#pragma unroll
      for (int w = 0; w < TN; ++w) bv[w] = b(k, cj[w]);
#pragma unroll
      for (int u = 0; u < TM; ++u)
#pragma unroll
        for (int w = 0; w < TN; ++w) acc[u][w] = fmaf(av[u], bv[w], acc[u][w]);
    }
#pragma unroll
    for (int u = 0; u < TM; ++u)
#pragma unroll
      for (int w = 0; w < TN; ++w) {
        const int i = it + u * tm, j = jt + w * tn;
        if (i < M && j < Nc) epi(i, j, acc[u][w]);
      }
  }
}

// Deterministic block sum of one value per thread (fixed tree) over a block of kThreads threads (a
// power of two); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* red, int tid) {
  red[tid] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  const float r = red[0];
  __syncthreads();
  return r;
}

// Stages rows [x0, x0 + tx) of a (P, N) fp32 state into tl (pitch qn).
__device__ __forceinline__ void stage_state_tile(const float* state, int x0, int tx, int N, int qn,
                                                 float* tl, int tid) {
#pragma unroll 8
  for (int i = tid; i < tx * N; i += kThreads) {
    const int r = i / N, n = i % N;
    tl[r * qn + n] = state[static_cast<int64_t>(x0 + r) * N + n];
  }
}

// ---------------------------------------------------------------------------------------------
// theta wrapped to [0, 2 pi) as wrap_2pi does, with a multiply instead of a float64 division
// (it sits on the sequential angle walk of every chunk).
__device__ __forceinline__ double wrap_2pi_mul(double x) {
  const double two_pi = 2.0 * kPiD, inv = 1.0 / (2.0 * kPiD);
  const double w = x - two_pi * floor(x * inv);
  return w >= two_pi ? w - two_pi : (w < 0.0 ? w + two_pi : w);
}

// Chunk loader: scalars (cs, e, w, fw, gamma, lambda, dt), the wrapped angle of every (token,
// rope pair), then rotated biased q and k rows and v * psi rows (rows past the chunk are zero).
// psi must already be in shared memory (par); `scratch` holds 2 * R * N floats (the biases).
// Global loads are issued by all threads first (independent, so many are in flight) and the
// sequential parts read shared memory: with one CTA per SM nothing else hides their latency.
// Ends with a barrier.
// Per chunk, shared by the SIMT and tensor-core chunk kernels (all threads of the block call it):
// the angle increments th (m x NA) walked in float64 from the chunk's start angle into wrapped
// angles in place, and the decay factors ex = exp(cs), fw = exp(cs_last - cs) w of the m tokens
// (threads 32..32+m). The walk runs in segs = min(kThreads, part_doubles) / NA segments of the
// tokens: thread (s, a) sums segment s's increments of pair a into part (float64), and after a
// barrier walks them from the start angle plus the earlier segments' sums, added in segment order
// (a fixed order: deterministic; it differs from one serial walk by float64 rounding, ~1e-16
// relative). The caller synchronizes before reading the results.
__device__ __forceinline__ void chunk_angles_and_decays(const BwdParams& bp, const Chunk& ck,
                                                        int h, int NA, int m, float* th,
                                                        const float* cs, const float* w,
                                                        float* ex, float* fw, double* part,
                                                        int part_doubles, int tid) {
  if (tid >= 32 && tid - 32 < m) {
    const int t = tid - 32;
    ex[t] = expf(cs[t]);
    fw[t] = expf(cs[m - 1] - cs[t]) * w[t];
  }
  if (NA == 0) return;  // uniform: no thread reaches the barrier below
  int segs = imin(kThreads, part_doubles) / NA;
  if (segs < 1) segs = 1;
  const int len = (m + segs - 1) / segs, s = tid / NA, a = tid - s * NA;
  const bool mine = s < segs;
  const int t0 = mine ? s * len : 0, t1 = mine ? imin(t0 + len, m) : 0;
  if (mine && segs > 1) {
    double d = 0.0;
    for (int t = t0; t < t1; ++t) d += static_cast<double>(th[t * NA + a]);
    part[s * NA + a] = d;
  }
  __syncthreads();
  if (mine) {
    double base = bp.ws.theta[(static_cast<int64_t>(ck.cid) * bp.p.H + h) * NA + a];
    for (int u = 0; u < s; ++u) base += part[u * NA + a];
    for (int t = t0; t < t1; ++t) {
      base += static_cast<double>(th[t * NA + a]);
      th[t * NA + a] = static_cast<float>(wrap_2pi_mul(base));
    }
  }
}

// First part of both chunk loaders (kThreads threads): the per-token scalars lambda, dt, gamma,
// w and adt (in cs) of the m tokens, the q and k biases (qb, kb: R * N each) and the raw angles
// (th).
// Global loads only, independent, so many are in flight.
__device__ __forceinline__ void load_chunk_inputs(const BwdParams& bp, const Chunk& ck, float* sc,
                                                  float* th, float* qb, float* kb, int tid) {
  const CoreParams& p = bp.p;
  const int N = p.N, R = p.R, NA = p.NA, m = ck.m, h = ck.h, b = ck.b;
  const int l0 = ck.begin + ck.t0;
  float* cs = sc + kCs * kMaxRows;
  float* w = sc + kW * kMaxRows;
  float* gam = sc + kGam * kMaxRows;
  float* lam = sc + kLam * kMaxRows;
  float* dtv = sc + kDt * kMaxRows;
  if (tid < m) {
    const int l = l0 + tid;
    const float la = sigmoidf_(in_bhl(p.trap, b, h, l)), dl = in_bhl(p.dt, b, h, l);
    lam[tid] = la, dtv[tid] = dl, gam[tid] = la * dl;
    const float sg = ck.t0 + tid + 1 < ck.n ? (1.f - sigmoidf_(in_bhl(p.trap, b, h, l + 1))) *
                                                  in_bhl(p.dt, b, h, l + 1)
                                            : 0.f;
    w[tid] = la * dl + sg;
    cs[tid] = in_bhl(p.adt, b, h, l);
  }
  for (int i = tid; i < R * N; i += kThreads) {
    qb[i] = dload_ro(p.q_bias, bias_off(p.q_bias, h, i / N, i % N));
    kb[i] = dload_ro(p.k_bias, bias_off(p.k_bias, h, i / N, i % N));
  }
  // A warp per token, lanes over the rope pairs (no index division).
  for (int a = tid % 32; a < NA; a += 32) {
#pragma unroll 4
    for (int t = tid / 32; t < m; t += kThreads / 32) th[t * NA + a] = angle_at(p, b, l0 + t, h, a);
  }
}

// Cumulative sums over a warp holding two values a lane (lane l: items 2l and 2l + 1, m <= 64):
// prefix sums (kReverse false) or suffix sums (true), item 2l's in r0 and 2l + 1's in r1, in one
// fixed order of fp32 additions (deterministic). A Kogge-Stone scan of the lane pairs' sums, then
// each lane adds its own items to the sum of the lanes before it.
template <bool kReverse>
__device__ __forceinline__ void warp_pair_scan(float v0, float v1, int lane, float& r0, float& r1) {
  float s = v0 + v1;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float n =
        kReverse ? __shfl_down_sync(0xffffffffu, s, o) : __shfl_up_sync(0xffffffffu, s, o);
    if (kReverse ? lane + o < 32 : lane >= o) s += n;
  }
  float before = kReverse ? __shfl_down_sync(0xffffffffu, s, 1) : __shfl_up_sync(0xffffffffu, s, 1);
  if (lane == (kReverse ? 31 : 0)) before = 0.f;
  if (kReverse) {
    r1 = v1 + before;
    r0 = v0 + r1;
  } else {
    r0 = before + v0;
    r1 = r0 + v1;
  }
}

// After load_chunk_inputs and a barrier: cs summed in place (cumulative, warp 0; m <= 64) and the
// raw angles replaced by their increments (float, as the forward rounds them).
__device__ __forceinline__ void chunk_cumsum_and_increments(float* sc, float* th, int m, int NA,
                                                            int tid) {
  float* cs = sc + kCs * kMaxRows;
  const float* dtv = sc + kDt * kMaxRows;
  if (tid < 32) {  // warp 0: two tokens per lane, a scan over the lanes (fixed order); m <= 64
    const int t0 = 2 * tid;
    float c0, c1;
    warp_pair_scan<false>(t0 < m ? cs[t0] : 0.f, t0 + 1 < m ? cs[t0 + 1] : 0.f, tid, c0, c1);
    if (t0 < m) cs[t0] = c0;
    if (t0 + 1 < m) cs[t0 + 1] = c1;
  }
  for (int t = tid / 32; t < m; t += kThreads / 32)  // a warp per token (no index division)
    for (int a = tid % 32; a < NA; a += 32)
      th[t * NA + a] = static_cast<float>(angle_inc(th[t * NA + a], dtv[t]));
}

__device__ void load_chunk(const BwdParams& bp, const Chunk& ck, const BwdSmem& lay, float* sm,
                           float* scratch, bool want_q, bool want_k, bool want_v, int tid) {
  const CoreParams& p = bp.p;
  const int N = p.N, P = p.P, R = p.R, NA = p.NA, m = ck.m, mr = ck.mr, h = ck.h, b = ck.b;
  const int l0 = ck.begin + ck.t0;
  float* sc = sm + lay.scal;
  float* cs = sc + kCs * kMaxRows;
  float* ex = sc + kE * kMaxRows;
  float* w = sc + kW * kMaxRows;
  float* fw = sc + kFw * kMaxRows;
  const float* psi = sm + lay.par;
  float* th = sm + lay.th;
  float* qb = scratch;
  float* kb = scratch + R * N;
  load_chunk_inputs(bp, ck, sc, th, qb, kb, tid);
  // q and k rows, not yet biased nor rotated; v * psi rows.
#pragma unroll 8
  for (int i = tid; i < lay.rows * N; i += kThreads) {
    const int row = i / N, n = i % N, t = row / R, r = row % R;
    if (want_q)
      sm[lay.q + row * lay.qn + n] = row < mr ? dload_ro(p.q, qk_off(p.q, b, l0 + t, r, ck.g, n)) : 0.f;
    if (want_k)
      sm[lay.k + row * lay.qn + n] = row < mr ? dload_ro(p.k, qk_off(p.k, b, l0 + t, r, ck.g, n)) : 0.f;
  }
  if (want_v) {
#pragma unroll 8
    for (int i = tid; i < lay.rows * P; i += kThreads) {
      const int row = i / P, x = i % P, t = row / R, r = row % R;
      float val = 0.f;
      if (row < mr)
        val = dload_ro(p.v, b * p.v.stride[0] + static_cast<int64_t>(l0 + t) * p.v.stride[1] +
                                h * p.v.stride[2] + x * p.v.stride[3]) *
              psi[r * P + x];
      sm[lay.v + row * lay.vp + x] = val;
    }
  }
  __syncthreads();
  chunk_cumsum_and_increments(sc, th, m, NA, tid);
  for (int i = tid; i < mr * N; i += kThreads) {
    const int row = i / N, n = i % N, r = row % R;
    if (want_q) sm[lay.q + row * lay.qn + n] += qb[r * N + n];
    if (want_k) sm[lay.k + row * lay.qn + n] += kb[r * N + n];
  }
  __syncthreads();
  chunk_angles_and_decays(bp, ck, h, NA, m, th, cs, w, ex, fw,
                          reinterpret_cast<double*>(sm + lay.red), kThreads / 2, tid);
  __syncthreads();
  // Rotate each rope pair of each row in place.
  for (int i = tid; i < mr * NA; i += kThreads) {
    const int row = i / NA, a = i % NA, t = row / R;
    int ia, ib;
    pair_members(p.interleaved, N, a, &ia, &ib);
    float sn, cn;
    sincosf(th[t * NA + a], &sn, &cn);
    if (want_q) {
      float* x = sm + lay.q + row * lay.qn;
      const float xa = x[ia], xb = x[ib];
      x[ia] = xa * cn - xb * sn;
      x[ib] = xa * sn + xb * cn;
    }
    if (want_k) {
      float* x = sm + lay.k + row * lay.qn;
      const float xa = x[ia], xb = x[ib];
      x[ia] = xa * cn - xb * sn;
      x[ib] = xa * sn + xb * cn;
    }
  }
  __syncthreads();
}

// The decay exp(cs_i - cs_j) between tokens ti and tj of a chunk. kFast (the tensor-core
// kernels): on the MUFU (ex2_approx), as the tensor-core forward's mask.
template <bool kFast = false>
__device__ __forceinline__ float chunk_decay(const float* cs, int ti, int tj) {
  return kFast ? ex2_approx((cs[ti] - cs[tj]) * kLog2e) : expf(cs[ti] - cs[tj]);
}

// Coefficient of the time-level mask of DESIGN §2.5 for tokens (ti, tj) of a chunk.
template <bool kFast = false>
__device__ __forceinline__ float mask_coef(const float* cs, const float* w, const float* gam,
                                           int ti, int tj) {
  if (tj < ti) return chunk_decay<kFast>(cs, ti, tj) * w[tj];
  return tj == ti ? gam[ti] : 0.f;
}

}  // namespace mamba3::cuda::bwd
