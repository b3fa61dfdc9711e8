// Chunked prefill forward on the tensor cores (mma.sync m16n8k16, bf16 operands, fp32
// accumulation) for bf16 q, k, v with 16-byte aligned rows. One CTA of 8 warps per (sequence,
// head, segment) walks its chunks of kTcRows = 64 rows (C = 64 / R tokens, row t*R + r):
//   scores = Q K^T (the 10 causal 16x16 blocks, each by one warp) -> mask -> bf16 score tile
//   Y      = A V + diag(exp(cs)) Q S^T + D v          (registers, fp32)
//   S      = exp(cs_last) S + (fw V)^T K              (fp32 state in registers)
//   out    = norm/gate/rank reduction of Y            (from registers)
// Every input tile of the next chunk is copied while the current chunk computes (DESIGN.md §3):
// k one chunk ahead into a second buffer; z at the chunk's start for its own epilogue; q, v and
// the angles after the products (the score tile reuses the angle buffer). All of them come
// through the copy engine (TMA, cuda/common/tma.cuh: one thread issues a box per tile,
// completing on an mbarrier). q and k are (C tokens, R ranks, N + 8 columns) boxes of a rank-5
// view whose last 8 columns lie past the tensor's N and arrive as zeros: the rows land with the
// padded pitch that keeps the ldmatrix reads conflict-free.
// Per-token scalars are prefetched into registers. Rounded to bf16 on the way (DESIGN.md §2.6):
// rotated q and k, v*psi, the masked scores, the state as the operand of Q S^T, and fw*v*psi. The
// state itself and every sum stay fp32.
//
// Sequence parallelism (DESIGN.md §2.5): with `nseg` > 1 a sequence is cut into segments of
// seg_len tokens. Pass 1 (kStates) runs the segments before the last one with zero state and
// zero angle (segment 0 from the true initial states) and writes each one's end state, angle
// and decay; fwd_tc_combine turns them into absolute start states (a segment's local state is
// rotated by its start angle, pair by pair, then decayed and summed in order); pass 2 runs
// every segment from its start state. Pass 1 may cut finer than pass 2 (`sub` > 1: each of
// pass 2's segments is `sub` of pass 1's), so that it too fills the GPU where few segments
// precede the last one; pass 2's segment j then starts at pass 1's segment j * sub.
#pragma once

#include <type_traits>

#include "cuda/common/async_copy.cuh"
#include "cuda/common/layer_io.cuh"
#include "cuda/common/mma.cuh"
#include "cuda/common/tile_record.cuh"
#include "cuda/common/tma.cuh"

namespace mamba3::cuda {

inline constexpr int kTcThreads = 256;
inline constexpr int kTcRows = 64;
inline constexpr int kScp = kTcRows + 8;  // pitch of the score tile (bf16)

// Sequence split (pass 1 outputs, pass 2 inputs); nseg == 1: no split, pointers unused.
struct SegParams {
  int nseg = 1;
  int seg_len = 0;                 // tokens per segment, a multiple of 64
  int sub = 1;                     // pass 1's segments per pass 2 segment (see above)
  float* end_state = nullptr;      // (S*H*nseg, P, N)
  double* end_theta = nullptr;     // (S*H*nseg, NA): segment 0 absolute, others local
  float* end_decay = nullptr;      // (S*H*nseg,)
  float* start_state = nullptr;    // (S*H*nseg, P, N), segments >= 1
  double* start_theta = nullptr;   // (S*H*nseg, NA), segments >= 1
};

// Pass 2 (nseg segments, sub > 1): the slot of pass 1's arrays (nseg * sub segments per
// sequence and head) where segment `slot` starts.
__host__ __device__ inline int64_t seg_start_slot(const SegParams& sp, int slot) {
  return static_cast<int64_t>(slot / sp.nseg) * sp.nseg * sp.sub + (slot % sp.nseg) * sp.sub;
}

template <int N, int P>
struct TcCfg {
  static constexpr int kQp = N + 8;  // bf16 pitches padded by 16 bytes: conflict-free ldmatrix
  // fp32 q / k bias rows padded by 32 bytes: the rope's lanes (one column group, R ranks) read
  // R rows that then start 8 banks apart instead of all in one bank.
  static constexpr int kBp = N + 8;
  static constexpr int kVp = P + 8;
  static constexpr int kXT = P / 16;     // 16-row tiles of the state
  static constexpr int kWX = 8 / kXT;    // warps sharing one state row tile
  static constexpr int kNW = N / kWX;    // state columns per warp
  static constexpr int kPH = P / 2;      // Y columns per warp
  static constexpr int kMinBlocks = P == 128 ? 1 : 2;  // P = 128: registers (Y, state)
};

struct TcLay {
  int bar, q, k0, k1, vs, ss, vraw, z, ang, theta, scal, der, rowsq, par, cell, bytes;
};

__host__ __device__ constexpr int tc_up16(int x) { return (x + 15) & ~15; }
__host__ __device__ constexpr int tc_up128(int x) { return (x + 127) & ~127; }

// Pitch (floats) of the angle tile's rows: NA + 4, so that consecutive token rows start 4 banks
// apart (at NA = 32 an unpadded row starts in bank 0 and a warp reading one angle column of 32
// rows conflicts 32 ways). The copy engine's box is 4 columns wider than the angles; the extra
// ones lie past the tensor's NA and arrive as zeros (as q and k get N + 8).
__host__ __device__ constexpr int tc_ang_pitch(int NA) { return NA + 4; }

// The copy engine's maps of the tiles it moves (fwd_tc_launch.cuh, forward_maps): q and k rows
// (boxes of C tokens x R ranks x (N + 8) bf16), v and z rows (C tokens x P bf16) and fp32
// angle rows (C x NA, landing at the pitch tc_ang_pitch(NA)). z unused without
// CoreParams::z_vec, ang without ang_vec4 or with NA = 0.
struct FwdMaps {
  TmaMap q, k, v, z, ang;
};

// Shared-memory byte offsets for rank R and NA angles from the (128-byte aligned) dynamic
// shared memory base; the copy engine's destinations vraw, z and ang are 128-byte aligned.
template <int N, int P>
__host__ __device__ inline TcLay tc_layout(int R, int NA) {
  using Cfg = TcCfg<N, P>;
  const int C = kTcRows / R;
  TcLay l{};
  int o = 0;
  // mbarriers first (at the base: no offset kept in a register): [0] the chunk's q, k, v and
  // angle rows, [1] its z rows; the tiles from 128 bytes on (the copy engine's alignment).
  l.bar = o, o = 128;
  l.q = o, o += kTcRows * Cfg::kQp * 2;
  l.k0 = o, o += kTcRows * Cfg::kQp * 2;
  l.k1 = o, o += kTcRows * Cfg::kQp * 2;
  l.vs = o, o += kTcRows * Cfg::kVp * 2;
  l.ss = o, o += P * Cfg::kQp * 2;
  o = tc_up128(o);
  l.vraw = o, o += tc_up128(C * P * 2);
  l.z = o, o += tc_up128(C * P * 2);
  // Raw angles, then (after the rope) the chunk's masked bf16 scores (64 x 72).
  const int ang_bytes = C * tc_ang_pitch(NA) * 4;
  l.ang = o, o += tc_up16(ang_bytes > kTcRows * kScp * 2 ? ang_bytes : kTcRows * kScp * 2);
  l.theta = o, o += 64 * 8;
  l.scal = o, o += tc_up16(3 * (C + 1) * 4);     // adt, dt, trap of C + 1 tokens
  l.der = o, o += 5 * kTcRows * 4;               // cs, ex, gam, w, fw
  l.rowsq = o, o += 2 * kTcRows * 4;             // norm: partial sums of squares per half
  l.par = o, o += tc_up16((3 * R * P + P + 2 * R * Cfg::kBp) * 4);  // psi, zeta, phi, wn, qb, kb
  l.cell = o, o += 16;  // kSave: the saved cell of the sequence's first chunk (int64); D (float)
  l.bytes = o;
  return l;
}

__device__ __forceinline__ float2 bf16x2_bits_to_float2(uint32_t u) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}

// Both bf16 halves of a packed pair scaled (and rounded back to bf16).
__device__ __forceinline__ uint32_t scale_bf16x2(uint32_t u, float lo, float hi) {
  return pack_bf16(__uint_as_float(u << 16) * lo, __uint_as_float(u & 0xffff0000u) * hi);
}

// sin and cos of angle th[i] for a rope pair i (no rotation, sin 0 and cos 1 exactly, for
// i >= NA): selects rather than branches.
__device__ __forceinline__ void rope_sincos(const float* th, int i, int NA, float* sn, float* cs) {
  float s_, c_;
  __sincosf(i < NA ? th[i] : 0.f, &s_, &c_);
  *sn = i < NA ? s_ : 0.f;
  *cs = i < NA ? c_ : 1.f;
}

// Rotates 8 consecutive elements [c*8, c*8+8) of a row (interleaved pairs lie inside them) by
// the token's angles th[i], i < NA.
__device__ __forceinline__ void rope8_interleaved(float (&x)[8], int c, int NA, const float* th,
                                                  float (&y)[8]) {
  if (c * 4 >= NA) return;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    float sn, cs;
    rope_sincos(th, c * 4 + e, NA, &sn, &cs);
    const float xa = x[2 * e], xb = x[2 * e + 1], ya = y[2 * e], yb = y[2 * e + 1];
    x[2 * e] = xa * cs - xb * sn, x[2 * e + 1] = xa * sn + xb * cs;
    y[2 * e] = ya * cs - yb * sn, y[2 * e + 1] = ya * sn + yb * cs;
  }
}

// rope8_interleaved with the 4 angles th[c*4 .. c*4 + 3] read as one float4 (16-byte aligned:
// NA a multiple of 4 and rows of tc_ang_pitch(NA) floats); a warp reading 8 consecutive token
// rows per phase then touches every bank once.
__device__ __forceinline__ void rope8_interleaved_v4(float (&x)[8], int c, int NA, const float* th,
                                                     float (&y)[8]) {
  if (c * 4 >= NA) return;
  const float4 t4 = *reinterpret_cast<const float4*>(th + c * 4);
  const float tv[4] = {t4.x, t4.y, t4.z, t4.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    float sn, cs;
    __sincosf(tv[e], &sn, &cs);
    const float xa = x[2 * e], xb = x[2 * e + 1], ya = y[2 * e], yb = y[2 * e + 1];
    x[2 * e] = xa * cs - xb * sn, x[2 * e + 1] = xa * sn + xb * cs;
    y[2 * e] = ya * cs - yb * sn, y[2 * e + 1] = ya * sn + yb * cs;
  }
}

// x[e] += bias[e] for 8 floats at a 32-byte aligned shared address.
__device__ __forceinline__ void add_bias8(float (&x)[8], const float* bias) {
  const float4 b0 = reinterpret_cast<const float4*>(bias)[0];
  const float4 b1 = reinterpret_cast<const float4*>(bias)[1];
  x[0] += b0.x, x[1] += b0.y, x[2] += b0.z, x[3] += b0.w;
  x[4] += b1.x, x[5] += b1.y, x[6] += b1.z, x[7] += b1.w;
}

// The angle tiles of layouts the float4 copy does not take (fp32 rows not 16-byte aligned, other
// dtypes), out of line: rarely taken, and inlined its registers pushed the main loop to spill.
__device__ __noinline__ void pf_ang_general(const void* data, DType dtype, int64_t base,
                                            int64_t s_t, int64_t s_a, float* ang, int m, int C,
                                            int NA, int ap, int tid) {
  DTensor A;  // the angles as dload_ro sees them: element offsets computed here
  A.data = const_cast<void*>(data), A.dtype = dtype, A.ndim = 1, A.stride[0] = 1;
  auto off = [&](int t, int a) { return base + t * s_t + a * s_a; };
  if (dtype == DType::kF32) {
    for (int i = tid; i < C * NA; i += kTcThreads) {
      const int t = i / NA, a = i % NA;
      const bool ok = t < m;
      cp_async4(ang + t * ap + a, static_cast<const float*>(A.data) + (ok ? off(t, a) : 0), ok);
    }
  } else {  // other dtypes: plain loads (visible after the next barrier)
    for (int i = tid; i < C * NA; i += kTcThreads) {
      const int t = i / NA, a = i % NA;
      ang[t * ap + a] = t < m ? dload_ro(A, off(t, a)) : 0.f;
    }
  }
}

// The warp that runs a chunk's decay prefix beside its share of the angle prefix (8 lanes per
// angle, 32 angles per round): the last warp, which has no angles where NA <= 28 (at NA = 16 the
// state pass otherwise spent 28 % of its stall samples at the barrier after the two prefixes,
// warp 0 doing both), else warp 0.
__host__ __device__ constexpr int tc_decay_warp(int NA) {
  return NA <= kTcThreads / 8 - 4 ? kTcThreads / 32 - 1 : 0;
}

// Where a CTA of fwd_tc_kernel works: its (sequence, head, segment) and token range.
struct TcCta {
  int s, h, g, b, seg, seq_begin, seq_end, n_seq, t_begin, t_end;
  int last;             // the sequence's last segment (0 without a split)
  bool last_seg, idle;  // idle: nothing to do in this pass (the whole CTA returns)
};

__device__ __forceinline__ TcCta tc_cta(const CoreParams& p, const SegParams& sp, int slot,
                                        bool states_pass) {
  TcCta c;
  c.seg = slot % sp.nseg;
  const int sh = slot / sp.nseg;
  c.s = sh / p.H, c.h = sh % p.H, c.g = c.h / p.hpg;
  c.b = c.s, c.seq_begin = 0, c.seq_end = p.L;
  if (p.cu_seqlens) {
    c.b = 0;
    c.seq_begin = p.cu_seqlens[c.s * p.cu_stride];
    c.seq_end = p.cu_seqlens[(c.s + 1) * p.cu_stride];
  }
  c.n_seq = c.seq_end - c.seq_begin;
  c.t_begin = 0, c.t_end = c.n_seq, c.last = 0, c.last_seg = true, c.idle = false;
  if (sp.nseg > 1) {
    c.last = c.n_seq == 0 ? 0 : (c.n_seq - 1) / sp.seg_len;
    // Pass 1 (segments of a sub-th of pass 2's): the segments before pass 2's last one.
    c.idle = c.seg > c.last || (states_pass && c.seg >= c.last / sp.sub * sp.sub);
    c.t_begin = c.seg * sp.seg_len;
    c.t_end = min(c.n_seq, c.t_begin + sp.seg_len);
    c.last_seg = c.seg == c.last;
  }
  return c;
}

// The CTA's (kCta) or the thread's index through a volatile read: what is computed from it
// again after the chunk loop is not merged with the first computation, so those values need no
// registers across the loop (where two CTAs per SM leave 128 per thread, all taken).
template <bool kCta>
__device__ __forceinline__ int index_again() {
#ifndef MAMBA3_CUDA_EMU
  int v;
  if constexpr (kCta)
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(v));
  else
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(v));
  return v;
#else
  return static_cast<int>(kCta ? blockIdx.x : threadIdx.x);
#endif
}
__device__ __forceinline__ int ctaid_x_again() { return index_again<true>(); }
__device__ __forceinline__ int tid_x_again() { return index_again<false>(); }

// kSave (training; not with kStates): every chunk also writes what the backward's loader would
// compute (cuda/common/tile_record.cuh): its start state and decay, and its tile record (the
// rotated q, k and v psi tiles, wrapped angles and scalar arrays exactly as this kernel uses
// them), so the backward skips its own loader pass and state scan; kSaveY also y before the
// output stage (saved_y), so the backward's chunk_out does not recompute it.
template <int N, int P, bool kStates, bool kSave = false, bool kSaveY = false>
__global__ void __launch_bounds__(kTcThreads, TcCfg<N, P>::kMinBlocks)
    fwd_tc_kernel(CoreParams p, SegParams sp, SavedPtrs sv, const __grid_constant__ FwdMaps mp) {
  static_assert(!(kStates && kSave), "the state pass saves nothing");
  static_assert(kSave || !kSaveY, "y is saved with the records");
  using Cfg = TcCfg<N, P>;
  constexpr int kQp = Cfg::kQp, kVp = Cfg::kVp;
  extern __shared__ __align__(128) unsigned char tc_smem[];
  unsigned char* sm = tc_smem;
  const int R = p.R, NA = p.NA, C = kTcRows / R, AP = tc_ang_pitch(NA);
  const int lr = 31 - __clz(R);  // R is a power of two: row t * R + r = (t << lr) | r
  const TcLay lay = tc_layout<N, P>(R, NA);
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(sm + lay.q);
  __nv_bfloat16* K0 = reinterpret_cast<__nv_bfloat16*>(sm + lay.k0);
  __nv_bfloat16* K1 = reinterpret_cast<__nv_bfloat16*>(sm + lay.k1);
  __nv_bfloat16* Vs = reinterpret_cast<__nv_bfloat16*>(sm + lay.vs);
  __nv_bfloat16* Ss = reinterpret_cast<__nv_bfloat16*>(sm + lay.ss);
  __nv_bfloat16* Vr = reinterpret_cast<__nv_bfloat16*>(sm + lay.vraw);
  __nv_bfloat16* Zs = reinterpret_cast<__nv_bfloat16*>(sm + lay.z);
  float* ang = reinterpret_cast<float*>(sm + lay.ang);  // raw angles, then wrapped theta
  __nv_bfloat16* Sc = reinterpret_cast<__nv_bfloat16*>(sm + lay.ang);  // scores after the rope
  double* theta = reinterpret_cast<double*>(sm + lay.theta);
  float* adt_s = reinterpret_cast<float*>(sm + lay.scal);
  float* dt_s = adt_s + (C + 1);
  float* tr_s = dt_s + (C + 1);
  float* cs = reinterpret_cast<float*>(sm + lay.der);
  float* ex = cs + kTcRows;
  float* gam = ex + kTcRows;
  float* wv = gam + kTcRows;
  float* fw = wv + kTcRows;
  float* rowsq = reinterpret_cast<float*>(sm + lay.rowsq);
  float* psi_s = reinterpret_cast<float*>(sm + lay.par);
  float* zeta_s = psi_s + R * P;
  float* phi_s = zeta_s + R * P;
  float* wn_s = phi_s + R * P;
  float* qb_s = wn_s + P;
  float* kb_s = qb_s + R * Cfg::kBp;                          // rows of kBp floats, as qb_s
  uint64_t* bar = reinterpret_cast<uint64_t*>(sm + lay.bar);  // a constant (0): no register

  const int slot = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gq = lane >> 2, tq = lane & 3;
  const TcCta cta = tc_cta(p, sp, slot, kStates);
  if (cta.idle) return;  // whole CTA: no barrier skipped
  if (tid == 0) {  // visible to all threads (and the copy engine) after the first barrier
    // The layout's 128-byte alignment of the copy engine's destinations assumes a 128-byte
    // aligned dynamic shared memory base (it starts the CTA's window: no static shared memory).
#ifndef MAMBA3_CUDA_EMU
    if (smem_addr(tc_smem) & 127u) __trap();
#endif
    mbar_init(bar, 1);
    mbar_init_fence();
    mbar_init(bar + 1, 1);
    mbar_init_fence();
  }
  const int s = cta.s, h = cta.h, g = cta.g, b = cta.b, seg = cta.seg;
  const int seq_begin = cta.seq_begin, n_seq = cta.n_seq, t_begin = cta.t_begin, t_end = cta.t_end;
  const bool from_segment = sp.nseg > 1 && seg > 0;  // start state from pass 1 / combine
  const bool has_init = p.init_ssm.defined();
  // kSave: the saved cell of the sequence's first chunk (flat chunk ids over the sequences, as
  // the backward numbers them: chunk_off[s] * H + h); summed over the earlier packed sequences
  // by all threads, combined through `rowsq` (free until the first chunk's norm). Kept in
  // shared memory (lay.cell), not in a register across the chunk loop.
  int64_t* cell0_s = reinterpret_cast<int64_t*>(sm + lay.cell);
  if constexpr (kSave) {
    if (blockIdx.x == 0 && tid < kSavedHeaderInts)
      reinterpret_cast<int32_t*>(sv.base)[tid] = sv.header[tid];
    if (p.cu_seqlens) {
      int part = 0;
      for (int u = tid; u < s; u += kTcThreads) {
        const int nu = p.cu_seqlens[(u + 1) * p.cu_stride] - p.cu_seqlens[u * p.cu_stride];
        part += (nu + C - 1) / C;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
      if (lane == 0) reinterpret_cast<int*>(sm + lay.rowsq)[warp] = part;
    } else if (tid == 0) {
      *cell0_s = static_cast<int64_t>(s) * ((p.L + C - 1) / C) * p.H + h;
    }
  }

  // ---- Per-head parameters and biases, once per CTA.
  load_head_params(p, h, psi_s, zeta_s, phi_s, wn_s, tid, kTcThreads);
  for (int i = tid; i < R * N; i += kTcThreads) {
    const int r = i / N, n = i % N;
    qb_s[r * Cfg::kBp + n] =
        p.q_bias.defined() ? dload_ro(p.q_bias, bias_off(p.q_bias, h, r, n)) : 0.f;
    kb_s[r * Cfg::kBp + n] =
        p.k_bias.defined() ? dload_ro(p.k_bias, bias_off(p.k_bias, h, r, n)) : 0.f;
  }
  if (tid < NA) {
    double th0 = 0.0;
    if (from_segment) {
      th0 = kStates ? 0.0 : sp.start_theta[seg_start_slot(sp, slot) * NA + tid];
    } else if (has_init) {
      th0 = dload_f64(p.init_angle, s * p.init_angle.stride[0] + h * p.init_angle.stride[1] +
                                        tid * p.init_angle.stride[2]);
    }
    theta[tid] = th0;
  }

  auto tok = [&](int t) { return seq_begin + t; };  // t: token index inside the sequence
  auto scal_ptr = [&](const DTensor& T, int t) {
    return b * T.stride[0] + h * T.stride[1] + static_cast<int64_t>(tok(t)) * T.stride[2];
  };

  // ---- Copies of the tiles of the chunk starting at token c0 (m tokens), through the copy
  // engine. The k rows of the next chunk go on bar[0] without an arrival (pf_k, after S1); q,
  // v and the fp32 angle rows (ang_vec4) add their bytes and the phase's one arrival (pf_tiles,
  // after S4), so bar[0]'s phase `it` completes when all of chunk `it`'s tiles have landed.
  // Rows past the view's end arrive as zeros; rows of a following sequence or segment are zeroed
  // after the wait (zero_tail). Other angle layouts: every thread, pf_ang_general (cp.async
  // group or plain loads, zero past m).
  constexpr uint32_t kQkBytes = kTcRows * kQp * 2;
  auto pf_k = [&](__nv_bfloat16* dst, int c0) {
    if (tid_x_again() == 0) {
      mbar_expect_tx(bar, kQkBytes);
      tma_load_5d(dst, &mp.k, 0, 0, tok(c0), g, b, bar);
    }
  };
  auto pf_tiles = [&](int c0, int m) {
    const bool ang_tma = p.ang_vec4 && NA > 0;
    if (tid_x_again() == 0) {
      mbar_arrive_expect_tx(bar, static_cast<uint32_t>((kStates ? 0 : kQkBytes) + C * P * 2 +
                                                       (ang_tma ? C * AP * 4 : 0)));
      if (!kStates) tma_load_5d(Qs, &mp.q, 0, 0, tok(c0), g, b, bar);
      tma_load_4d(Vr, &mp.v, 0, tok(c0), h, b, bar);
      if (ang_tma) tma_load_4d(ang, &mp.ang, 0, tok(c0), h, b, bar);
    }
    if (!p.ang_vec4) {
      const DTensor& A = p.angles;
      pf_ang_general(
          A.data, A.dtype,
          b * A.stride[0] + static_cast<int64_t>(tok(c0)) * A.stride[1] + h * A.stride[2],
          A.stride[1], A.stride[3], ang, m, C, NA, AP, tid_x_again());
    }
  };
  // After the wait for a chunk of m < C tokens: its q and k rows past m R, v rows (and
  // copy-engine angle rows) past m are zero, as the products and the saved record expect.
  auto zero_tail = [&](int m, __nv_bfloat16* Kc) {
    const int tid = tid_x_again();
    for (int i = tid; i < (kTcRows - m * R) * kQp / 8; i += kTcThreads) {
      reinterpret_cast<uint4*>(Kc + m * R * kQp)[i] = make_uint4(0, 0, 0, 0);
      if (!kStates) reinterpret_cast<uint4*>(Qs + m * R * kQp)[i] = make_uint4(0, 0, 0, 0);
    }
    uint4* v4 = reinterpret_cast<uint4*>(Vr + m * P);
    for (int i = tid; i < (C - m) * P / 8; i += kTcThreads) v4[i] = make_uint4(0, 0, 0, 0);
    if (p.ang_vec4) {
      uint4* a4 = reinterpret_cast<uint4*>(ang + m * AP);
      for (int i = tid; i < (C - m) * AP / 4; i += kTcThreads) a4[i] = make_uint4(0, 0, 0, 0);
    }
  };
  // z rows of the chunk at token c0 (z_vec) on bar[1], for its own epilogue.
  auto pf_z = [&](int c0) {
    if (p.z_vec && tid_x_again() == 0) {
      mbar_arrive_expect_tx(bar + 1, static_cast<uint32_t>(C * P * 2));
      tma_load_4d(Zs, &mp.z, 0, tok(c0), h, b, bar + 1);
    }
  };
  // Per-token scalars of tokens c0 .. c0 + C (one look-ahead token) into one register each.
  auto ld_scal = [&](int c0) {
    const int tid = tid_x_again();
    float v = 0.f;
    if (tid < 3 * (C + 1)) {
      const int which = tid / (C + 1), t = c0 + tid % (C + 1);
      const DTensor& T = which == 0 ? p.adt : (which == 1 ? p.dt : p.trap);
      if (t < n_seq) v = dload_ro(T, scal_ptr(T, t));
    }
    return v;
  };
  auto st_scal = [&](float v) {
    const int tid = tid_x_again();
    if (tid < 3 * (C + 1)) adt_s[tid] = v;  // adt_s, dt_s, tr_s are consecutive
  };

  // ---- Initial state: fp32 in registers (MMA accumulator layout of the state update), bf16
  // copy in Ss for Q S^T. Warp (xt, nh) owns rows 16 xt.. and columns nh * kNW.. of S.
  const int xt = warp % Cfg::kXT, nh = warp / Cfg::kXT;
  float sreg[Cfg::kNW / 8][4];
  {
    float sg0 = 0.f;
    if (!from_segment && has_init && n_seq > 0)
      sg0 = (1.f - sigmoidf_(dload_ro(p.trap, scal_ptr(p.trap, 0)))) *
            dload_ro(p.dt, scal_ptr(p.dt, 0));
    __syncthreads();  // psi_s (used by the initial state) ready
    if constexpr (kSave) {
      if (p.cu_seqlens && tid == 0) {
        int off = 0;
#pragma unroll
        for (int w8 = 0; w8 < kTcThreads / 32; ++w8) off += reinterpret_cast<const int*>(sm + lay.rowsq)[w8];
        *cell0_s = static_cast<int64_t>(off) * p.H + h;
      }
    }
    // Each element once, in a plain loop, into an fp32 staging tile over the q, k and v buffers
    // (unused until the first prefetch below), then into the registers of the fragment layout:
    // computing it in the 32-fold unrolled fragment loop spilled registers.
    float* stage = reinterpret_cast<float*>(sm + lay.q);
    static_assert(3 * kTcRows * kQp * 2 + kTcRows * kVp * 2 >= P * N * 4, "staging tile fits");
    for (int i = tid; i < P * N; i += kTcThreads) {
      const int x = i / N, n = i % N;
      float v0;
      if (from_segment)
        v0 = kStates ? 0.f : sp.start_state[(seg_start_slot(sp, slot) * P + x) * N + n];
      else
        v0 = initial_state_elem(p, s, h, x, n, sg0, psi_s);
      stage[i] = v0;
      if (!kStates) Ss[x * kQp + n] = __float2bfloat16_rn(v0);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < Cfg::kNW / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int x = xt * 16 + gq + (e >> 1) * 8, n = nh * Cfg::kNW + j * 8 + 2 * tq + (e & 1);
        sreg[j][e] = stage[x * N + n];
      }
    __syncthreads();  // the staging tile is read before the prefetches overwrite it
  }

  // ---- Prologue: the first chunk's tiles and scalars.
  if (t_begin < t_end) {
    const int m0 = min(C, t_end - t_begin);
    pf_k(K0, t_begin);
    pf_tiles(t_begin, m0);
  }
  cp_async_commit();
  st_scal(ld_scal(t_begin));

  float decay_prod = 1.f;  // kStates: product of the chunks' decays
  // D in shared memory (beside the saved cell), read where used: one register fewer across
  // the chunk loop, where the 128 of two CTAs per SM are all taken.
  float* dskip_s = reinterpret_cast<float*>(sm + lay.cell + 8);
  if (tid == 0) *dskip_s = p.d.defined() ? dload_ro(p.d, h * p.d.stride[0]) : 0.f;

  int it = 0;
  for (int c0 = t_begin; c0 < t_end; c0 += C, ++it) {
    // The thread's coordinates from a fresh read of its index each chunk (tid_x_again): the
    // compiler then keeps none of them live across the loop's back edge.
    const int tid = tid_x_again(), lane = tid & 31, warp = tid >> 5;
    const int gq = lane >> 2, tq = lane & 3;
    const int xt = warp % Cfg::kXT, nh = warp / Cfg::kXT;  // state fragment: row tile, columns
    [[maybe_unused]] const int rt = warp & 3, hh = warp >> 2;  // Y: row tile, column half
    const int m = min(C, t_end - c0), mr = m * R;
    const int c1 = c0 + C, m1 = c1 < t_end ? min(C, t_end - c1) : 0;
    __nv_bfloat16* Kc = (it & 1) ? K1 : K0;
    // kSave: this chunk's cell and record (C = 64 >> lr), recomputed where used; its start
    // state from the registers.
    auto save_cell = [&]() { return *cell0_s + static_cast<int64_t>(c0 >> (6 - lr)) * p.H; };
    auto save_rec = [&]() { return sv.tiles + save_cell() * sv.tr.bytes; };
    if constexpr (kSave) {
      float* st = sv.s_prev + save_cell() * (P * N);
#pragma unroll
      for (int j = 0; j < Cfg::kNW / 8; ++j) {
        const int x = xt * 16 + gq, n = nh * Cfg::kNW + j * 8 + 2 * tq;
        __stcs(reinterpret_cast<float2*>(st + x * N + n), make_float2(sreg[j][0], sreg[j][1]));
        __stcs(reinterpret_cast<float2*>(st + (x + 8) * N + n), make_float2(sreg[j][2], sreg[j][3]));
      }
    }
    cp_async_wait<0>();  // pf_ang_general's copies (angles not taken by the copy engine)
    mbar_wait(bar, it & 1);
    if (m < C) zero_tail(m, Kc);
    __syncthreads();  // S1: this chunk's tiles and scalars are in shared memory
    // k of the next chunk (bar[0]); z of this one (for its epilogue) on bar[1].
    if (m1 > 0) pf_k((it & 1) ? K0 : K1, c1);
    if (!kStates) pf_z(c0);
    const float scal_next = m1 > 0 ? ld_scal(c1) : 0.f;

    // ---- P1: angle prefix and decay prefix (warp tc_decay_warp). Angle a: 8 lanes, ts
    // consecutive tokens each. The carry (the lanes' totals, the chunk's end angle) is summed in
    // float64 term by term; a token's angle is its lane's start, wrapped once in float64, plus
    // the lane's float prefix (at most 8 terms), wrapped in float. Rows past m: zero.
    if (NA > 0) {
      const int ts = C >> 3;  // tokens per lane (R <= 8: at least one); 8 lanes per angle
      for (int a0 = 0; a0 < NA; a0 += kTcThreads / 8) {
        const int a = a0 + tid / 8, l8 = tid & 7;
        const bool av = a < NA;
        const double th0 = av ? theta[a] : 0.0;
        float* pa = ang + l8 * ts * AP + a;
        // Unrolled over at most 8 tokens, leaving at ts (uniform: a branch, not predicated
        // work): the loads and the tanh of a lane's tokens are independent, the sums chains.
        float inc[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          if (u >= ts) break;
          const int t = l8 * ts + u;
          inc[u] =
              av && t < m ? static_cast<float>(kPiD) * tanh_abs_err(pa[u * AP]) * dt_s[t] : 0.f;
        }
        double run = 0.0;
        float runf = 0.f, pre[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          if (u >= ts) break;
          run += static_cast<double>(inc[u]);
          runf += inc[u];
          pre[u] = runf;
        }
        double incl = run;
#pragma unroll
        for (int o = 1; o < 8; o <<= 1) {
          const double y = __shfl_up_sync(0xffffffffu, incl, o, 8);
          if (l8 >= o) incl += y;
        }
        const float start = static_cast<float>(wrap_2pi(th0 + (incl - run)));
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          if (u >= ts) break;
          const int t = l8 * ts + u;
          if (av) pa[u * AP] = t < m ? wrap_2pi_f(start + pre[u]) : 0.f;
        }
        __syncwarp();
        if (av && l8 == 7) theta[a] = wrap_2pi(th0 + incl);
      }
    }
    if (warp == tc_decay_warp(NA)) {
      const int t0 = 2 * lane, t1 = t0 + 1;
      const float a0 = t0 < m ? adt_s[t0] : 0.f, a1 = t1 < m ? adt_s[t1] : 0.f;
      const float pair = a0 + a1;
      float incl = pair;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const float y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      const float c_0 = incl - pair + a0, c_1 = incl;
      const float mine = ((m - 1) & 1) ? c_1 : c_0;
      const float cl = __shfl_sync(0xffffffffu, mine, (m - 1) >> 1);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int t = t0 + k;
        if (t >= C) break;
        const float c = k ? c_1 : c_0;
        float gv = 0.f, wvv = 0.f, csv = 0.f, exv = 0.f, fwv = 0.f;
        if (t < m) {
          const float lam = sigmoidf_(tr_s[t]), dl = dt_s[t];
          const float sg =
              c0 + t + 1 < n_seq ? (1.f - sigmoidf_(tr_s[t + 1])) * dt_s[t + 1] : 0.f;
          gv = lam * dl, wvv = lam * dl + sg, csv = c, exv = expf(c), fwv = expf(cl - c) * wvv;
        }
        gam[t] = gv, wv[t] = wvv, cs[t] = csv, ex[t] = exv, fw[t] = fwv;
      }
      if (kStates && lane == 0) decay_prod *= expf(cl);
      if (kSave && lane == 0) __stcs(sv.decay + save_cell(), expf(cl));
    }
    __syncthreads();  // S2: cs, ex, gam, w, fw and the chunk's angles ready

    // ---- P2: rotate (and bias) q and k in place; v * psi into Vs. Item i: row i % 64 and
    // 8-column group i / 64, so that a warp's lanes share one column group (whether it holds
    // rotated pairs is uniform across the warp: half the sincos and rotation instructions of a
    // row-major order) over 32 rows, which the padded pitches of the q / k rows and of the
    // angle rows (tc_ang_pitch) put into different banks.
    {
      const float* th = ang;
      if constexpr (kSave) {
        unsigned char* rec = save_rec();
        // The wrapped angles (C x NA, unpadded; zero past the chunk) from the tile's padded rows.
        if (NA % 4 == 0) {
          uint4* dst = reinterpret_cast<uint4*>(rec + sv.tr.th);
          const int q4 = NA / 4;
          for (int i = tid; i < C * q4; i += kTcThreads)
            __stcs(dst + i, *reinterpret_cast<const uint4*>(ang + (i / q4) * AP + 4 * (i % q4)));
        } else {
          float* dst = reinterpret_cast<float*>(rec + sv.tr.th);
          for (int i = tid; i < C * NA; i += kTcThreads)
            __stcs(dst + i, ang[(i / NA) * AP + i % NA]);
        }
      }
      if (p.interleaved) {
        constexpr int kCh = N / 8;
#pragma unroll 1
        for (int i = tid; i < kTcRows * kCh; i += kTcThreads) {
          const int row = i % kTcRows, c = i / kTcRows, t = row >> lr, r = row & (R - 1);
          if (t >= m) continue;
          uint4* kp = reinterpret_cast<uint4*>(Kc + row * kQp + c * 8);
          uint4* qp = reinterpret_cast<uint4*>(Qs + row * kQp + c * 8);
          float kf[8], qf[8] = {};
          bf16x8_to_float(*kp, kf);
          add_bias8(kf, kb_s + r * Cfg::kBp + c * 8);  // bias rows: 32-byte aligned (tc_layout)
          if (!kStates) {
            bf16x8_to_float(*qp, qf);
            add_bias8(qf, qb_s + r * Cfg::kBp + c * 8);
          }
          if (NA % 4 == 0)
            rope8_interleaved_v4(kf, c, NA, th + t * AP, qf);
          else
            rope8_interleaved(kf, c, NA, th + t * AP, qf);
          *kp = float8_to_bf16x8(kf);
          if (!kStates) *qp = float8_to_bf16x8(qf);
        }
      } else {
        constexpr int kCh = N / 16, half = N / 2;
#pragma unroll 1
        for (int i = tid; i < kTcRows * kCh; i += kTcThreads) {
          const int row = i % kTcRows, c = i / kTcRows, t = row >> lr, r = row & (R - 1);
          if (t >= m) continue;
          uint4* k0p = reinterpret_cast<uint4*>(Kc + row * kQp + c * 8);
          uint4* k1p = reinterpret_cast<uint4*>(Kc + row * kQp + half + c * 8);
          uint4* q0p = reinterpret_cast<uint4*>(Qs + row * kQp + c * 8);
          uint4* q1p = reinterpret_cast<uint4*>(Qs + row * kQp + half + c * 8);
          float k0[8], k1[8], q0[8] = {}, q1[8] = {};
          bf16x8_to_float(*k0p, k0);
          bf16x8_to_float(*k1p, k1);
          add_bias8(k0, kb_s + r * Cfg::kBp + c * 8),
              add_bias8(k1, kb_s + r * Cfg::kBp + half + c * 8);
          if (!kStates) {
            bf16x8_to_float(*q0p, q0), bf16x8_to_float(*q1p, q1);
            add_bias8(q0, qb_s + r * Cfg::kBp + c * 8),
                add_bias8(q1, qb_s + r * Cfg::kBp + half + c * 8);
          }
          if (c * 8 < NA) {
            const float* tht = th + t * AP;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              float sn, co;
              rope_sincos(tht, c * 8 + e, NA, &sn, &co);
              const float ka = k0[e], kb = k1[e];
              k0[e] = ka * co - kb * sn, k1[e] = ka * sn + kb * co;
              if (!kStates) {
                const float qa = q0[e], qbv = q1[e];
                q0[e] = qa * co - qbv * sn, q1[e] = qa * sn + qbv * co;
              }
            }
          }
          *k0p = float8_to_bf16x8(k0), *k1p = float8_to_bf16x8(k1);
          if (!kStates) *q0p = float8_to_bf16x8(q0), *q1p = float8_to_bf16x8(q1);
        }
      }
      constexpr int kVc = P / 8;
      if (!p.mimo_v.defined()) {  // psi = 1: bf16(v psi) is v, a copy (the rows past m are zero)
        for (int i = tid; i < kTcRows * kVc; i += kTcThreads) {
          const int row = i / kVc, c = i % kVc;
          *reinterpret_cast<uint4*>(Vs + row * kVp + c * 8) =
              *reinterpret_cast<const uint4*>(Vr + (row >> lr) * P + c * 8);
        }
      } else {
        for (int i = tid; i < kTcRows * kVc; i += kTcThreads) {
          const int row = i / kVc, c = i % kVc, t = row >> lr, r = row & (R - 1);
          float vf[8];
          if (t < m) {
            bf16x8_to_float(*reinterpret_cast<const uint4*>(Vr + t * P + c * 8), vf);
#pragma unroll
            for (int e = 0; e < 8; ++e) vf[e] *= psi_s[r * P + c * 8 + e];
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) vf[e] = 0.f;
          }
          *reinterpret_cast<uint4*>(Vs + row * kVp + c * 8) = float8_to_bf16x8(vf);
        }
      }
    }
    __syncthreads();  // S3: rotated tiles ready; the angle buffer now holds the scores

    // ---- P3a: the 10 causal 16x16 score blocks (rt, kt <= rt), each once: warp w takes blocks
    // w and w + 8. Mask M[i, j] = exp(cs_i - cs_j) w_j (token j before token i), gamma_i (same
    // token), else 0; rounded to bf16 into the score tile.
    if constexpr (!kStates) {
      for (int blk = warp; blk < 10; blk += 8) {
        // blk -> (rt, kt): 0:(0,0) 1:(1,0) 2:(1,1) 3:(2,0) 4:(2,1) 5:(2,2) 6..9:(3,0..3)
        const int brt = static_cast<int>((0x3333222110ULL >> (4 * blk)) & 0xF);
        const int bkt = blk - brt * (brt + 1) / 2;
        float sc[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
        for (int k0 = 0; k0 < N; k0 += 16) {
          uint32_t a[4], bb[4];
          load_a(a, Qs, kQp, brt * 16, k0, lane);
          load_b_nk(bb, Kc, kQp, bkt * 16, k0, lane);
          mma_bf16(sc[0], a, bb[0], bb[1]);
          mma_bf16(sc[1], a, bb[2], bb[3]);
        }
        const int ra = brt * 16 + gq, rb = ra + 8;
        const int ti[2] = {ra >> lr, rb >> lr};
        const float csi[2] = {cs[ti[0]], cs[ti[1]]}, gmi[2] = {gam[ti[0]], gam[ti[1]]};
        const bool rv[2] = {ra < mr, rb < mr};
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e1 = 0; e1 < 2; ++e1) {
            const int tj = (bkt * 16 + j * 8 + 2 * tq + e1) >> lr;
            const float csj = cs[tj], wj = wv[tj];
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
              float coef = 0.f;
              if (rv[hr])
                coef = tj < ti[hr] ? ex2_approx((csi[hr] - csj) * kLog2e) * wj : (tj == ti[hr] ? gmi[hr] : 0.f);
              sc[j][2 * hr + e1] *= coef;
            }
          }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int col = bkt * 16 + j * 8 + 2 * tq;
          *reinterpret_cast<uint32_t*>(Sc + ra * kScp + col) = pack_bf16(sc[j][0], sc[j][1]);
          *reinterpret_cast<uint32_t*>(Sc + rb * kScp + col) = pack_bf16(sc[j][2], sc[j][3]);
        }
      }
      __syncthreads();  // S3b: score tile complete
    }
    if constexpr (kSave) {  // the rotated q, k (and v psi) tiles (rows past the chunk are zero)
      auto tile = [&](const __nv_bfloat16* src, int pitch, int off, int cols) {
        const int c8 = cols / 8, lc = cols == 128 ? 4 : 3;  // cols in {64, 128}
        uint4* dst = reinterpret_cast<uint4*>(save_rec() + off);
#pragma unroll 1
        for (int i = tid; i < kTcRows * c8; i += kTcThreads)
          __stcs(dst + i, *reinterpret_cast<const uint4*>(src + (i >> lc) * pitch + (i & (c8 - 1)) * 8));
      };
      tile(Qs, kQp, sv.tr.q, N);
      tile(Kc, kQp, sv.tr.k, N);
      if (sv.tr.v >= 0) tile(Vs, kVp, sv.tr.v, P);  // the PsiV cache (tile_record)
      // The scalar arrays, all 64 entries (zero past the chunk's m tokens).
      float* sc = reinterpret_cast<float*>(save_rec() + sv.tr.sc);
      for (int i = tid; i < kLoaderScalars * kRecordRows; i += kTcThreads) {
        const int a = i >> 6, t = i & (kRecordRows - 1);
        float v = 0.f;
        if (t < m) {
          switch (a) {
            case kCs: v = cs[t]; break;
            case kE: v = ex[t]; break;
            case kW: v = wv[t]; break;
            case kFw: v = fw[t]; break;
            case kGam: v = gam[t]; break;
            case kLam: v = sigmoidf_(tr_s[t]); break;
            default: v = dt_s[t]; break;
          }
        }
        __stcs(sc + i, v);
      }
    }

    // ---- P3: Y for rows 16 rt.. and columns hh * kPH.. (skipped by the state pass).
    float ya[Cfg::kPH / 8][4];
    if constexpr (!kStates) {
      // Y = diag(exp(cs)) Q S^T first, then + A V one 16-token key block at a time (the
      // scores of a block live only while they are used: few registers).
#pragma unroll
      for (int j = 0; j < Cfg::kPH / 8; ++j) ya[j][0] = ya[j][1] = ya[j][2] = ya[j][3] = 0.f;
#pragma unroll
      for (int k0 = 0; k0 < N; k0 += 16) {
        uint32_t a[4];
        load_a(a, Qs, kQp, rt * 16, k0, lane);
#pragma unroll
        for (int n0 = 0; n0 < Cfg::kPH; n0 += 16) {
          uint32_t bb[4];
          load_b_nk(bb, Ss, kQp, hh * Cfg::kPH + n0, k0, lane);  // B[n][x] = S[x][n]
          mma_bf16(ya[n0 / 8], a, bb[0], bb[1]);
          mma_bf16(ya[n0 / 8 + 1], a, bb[2], bb[3]);
        }
      }
      const int ra = rt * 16 + gq, rb = ra + 8;
      {
        const float ea = ex[ra >> lr], eb = ex[rb >> lr];  // 0 past the chunk's tokens
#pragma unroll
        for (int j = 0; j < Cfg::kPH / 8; ++j) ya[j][0] *= ea, ya[j][1] *= ea, ya[j][2] *= eb, ya[j][3] *= eb;
      }
      // A V over the causal key blocks kt <= rt, A from the score tile.
      for (int kt = 0; kt <= rt; ++kt) {
        uint32_t a[4];
        load_a(a, Sc, kScp, rt * 16, kt * 16, lane);
#pragma unroll
        for (int n0 = 0; n0 < Cfg::kPH; n0 += 16) {
          uint32_t bb[4];
          load_b_kn(bb, Vs, kVp, hh * Cfg::kPH + n0, kt * 16, lane);
          mma_bf16(ya[n0 / 8], a, bb[0], bb[1]);
          mma_bf16(ya[n0 / 8 + 1], a, bb[2], bb[3]);
        }
      }
      // + D v psi in fp32 from the raw v (column pairs: one 4-byte and one 8-byte load each).
      if (p.d.defined()) {
        const float dskip = *dskip_s;
        const int tA = ra >> lr, rA = ra & (R - 1), tB = rb >> lr, rB = rb & (R - 1);
#pragma unroll
        for (int j = 0; j < Cfg::kPH / 8; ++j) {
          const int x = hh * Cfg::kPH + j * 8 + 2 * tq;
          const float2 va = bf16x2_bits_to_float2(*reinterpret_cast<const uint32_t*>(Vr + tA * P + x));
          const float2 vb = bf16x2_bits_to_float2(*reinterpret_cast<const uint32_t*>(Vr + tB * P + x));
          const float2 pa = *reinterpret_cast<const float2*>(psi_s + rA * P + x);
          const float2 pb = *reinterpret_cast<const float2*>(psi_s + rB * P + x);
          ya[j][0] += dskip * va.x * pa.x, ya[j][1] += dskip * va.y * pa.y;
          ya[j][2] += dskip * vb.x * pb.x, ya[j][3] += dskip * vb.y * pb.y;
        }
      }
      if constexpr (kSaveY) {  // y before the output stage, for the backward's chunk_out
        float* yc = saved_y(sv) + save_cell() * (kTcRows * P) + hh * Cfg::kPH + 2 * tq;
#pragma unroll
        for (int j = 0; j < Cfg::kPH / 8; ++j) {
          if (ra < mr)
            __stcs(reinterpret_cast<float2*>(yc + ra * P + j * 8), make_float2(ya[j][0], ya[j][1]));
          if (rb < mr)
            __stcs(reinterpret_cast<float2*>(yc + rb * P + j * 8), make_float2(ya[j][2], ya[j][3]));
        }
      }
      if (p.norm_weight.defined()) {
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int j = 0; j < Cfg::kPH / 8; ++j)
          s0 += ya[j][0] * ya[j][0] + ya[j][1] * ya[j][1],
              s1 += ya[j][2] * ya[j][2] + ya[j][3] * ya[j][3];
        s0 += __shfl_xor_sync(0xffffffffu, s0, 1);
        s0 += __shfl_xor_sync(0xffffffffu, s0, 2);
        s1 += __shfl_xor_sync(0xffffffffu, s1, 1);
        s1 += __shfl_xor_sync(0xffffffffu, s1, 2);
        if (tq == 0) rowsq[hh * kTcRows + ra] = s0, rowsq[hh * kTcRows + rb] = s1;
      }
    }
    if (!kStates && p.z_vec) mbar_wait(bar + 1, it & 1);  // z of this one
    // This thread's generic writes to buffers the copy engine refills next (the angles and
    // scores, zeroed tails) ordered before the copy engine's writes (issued after S4).
    fence_proxy_async();
    __syncthreads();  // S4: Q, Ss and the raw v are read; row sums and z visible
    if (m1 > 0) pf_tiles(c1, m1);
    cp_async_commit();

    // ---- P4: S = exp(cs_last) S + (fw V psi)^T K.
    {
      const float el = ex[m - 1];
#pragma unroll
      for (int j = 0; j < Cfg::kNW / 8; ++j)
        sreg[j][0] *= el, sreg[j][1] *= el, sreg[j][2] *= el, sreg[j][3] *= el;
#pragma unroll
      for (int k0 = 0; k0 < kTcRows; k0 += 16) {
        if (k0 < mr) {
          uint32_t a[4];
          load_a_trans(a, Vs, kVp, xt * 16, k0, lane);
          const float f0 = fw[(k0 + 2 * tq) >> lr], f1 = fw[(k0 + 2 * tq + 1) >> lr];
          const float f2 = fw[(k0 + 8 + 2 * tq) >> lr], f3 = fw[(k0 + 9 + 2 * tq) >> lr];
          a[0] = scale_bf16x2(a[0], f0, f1);
          a[1] = scale_bf16x2(a[1], f0, f1);
          a[2] = scale_bf16x2(a[2], f2, f3);
          a[3] = scale_bf16x2(a[3], f2, f3);
#pragma unroll
          for (int n0 = 0; n0 < Cfg::kNW; n0 += 16) {
            uint32_t bb[4];
            load_b_kn(bb, Kc, kQp, nh * Cfg::kNW + n0, k0, lane);
            mma_bf16(sreg[n0 / 8], a, bb[0], bb[1]);
            mma_bf16(sreg[n0 / 8 + 1], a, bb[2], bb[3]);
          }
        }
      }
      if constexpr (!kStates) {
#pragma unroll
        for (int j = 0; j < Cfg::kNW / 8; ++j) {
          const int x = xt * 16 + gq, n = nh * Cfg::kNW + j * 8 + 2 * tq;
          *reinterpret_cast<uint32_t*>(Ss + x * kQp + n) = pack_bf16(sreg[j][0], sreg[j][1]);
          *reinterpret_cast<uint32_t*>(Ss + (x + 8) * kQp + n) = pack_bf16(sreg[j][2], sreg[j][3]);
        }
      }
    }

    // ---- P5: output stage from the Y registers: RMSNorm, gate, rank reduction, store. Each
    // optional factor is one uniform branch around a loop over the thread's column pairs.
    if constexpr (!kStates) {
      const int ra = rt * 16 + gq, rb = ra + 8;
      const int tA = ra >> lr, rA = ra & (R - 1), tB = rb >> lr, rB = rb & (R - 1);
      if (p.norm_weight.defined()) {
        const float sa = rsqrtf((rowsq[ra] + rowsq[kTcRows + ra]) / P + p.eps);
        const float sb = rsqrtf((rowsq[rb] + rowsq[kTcRows + rb]) / P + p.eps);
#pragma unroll
        for (int j = 0; j < Cfg::kPH / 8; ++j) {
          const float2 w = *reinterpret_cast<const float2*>(wn_s + hh * Cfg::kPH + j * 8 + 2 * tq);
          ya[j][0] *= sa * w.x, ya[j][1] *= sa * w.y, ya[j][2] *= sb * w.x, ya[j][3] *= sb * w.y;
        }
      }
      if (p.z.defined()) {
        // silu(z zeta); zeta (MIMO_Z) multiplied only where given (absent it is 1).
        auto gate_loop = [&](auto with_zeta) {
#pragma unroll
          for (int j = 0; j < Cfg::kPH / 8; ++j) {
            const int x = hh * Cfg::kPH + j * 8 + 2 * tq;
            float2 za, zb;
            if (p.z_vec) {
              za = bf16x2_bits_to_float2(*reinterpret_cast<const uint32_t*>(Zs + tA * P + x));
              zb = bf16x2_bits_to_float2(*reinterpret_cast<const uint32_t*>(Zs + tB * P + x));
            } else {
              auto zl = [&](int t, int xx) {
                return t < m ? dload_ro(p.z, b * p.z.stride[0] +
                                                 static_cast<int64_t>(tok(c0 + t)) * p.z.stride[1] +
                                                 h * p.z.stride[2] + xx * p.z.stride[3])
                             : 0.f;
              };
              za = make_float2(zl(tA, x), zl(tA, x + 1)),
              zb = make_float2(zl(tB, x), zl(tB, x + 1));
            }
            if constexpr (decltype(with_zeta)::value) {
              const float2 qa = *reinterpret_cast<const float2*>(zeta_s + rA * P + x);
              const float2 qb = *reinterpret_cast<const float2*>(zeta_s + rB * P + x);
              za.x *= qa.x, za.y *= qa.y, zb.x *= qb.x, zb.y *= qb.y;
            }
            ya[j][0] *= silu_approx(za.x), ya[j][1] *= silu_approx(za.y);
            ya[j][2] *= silu_approx(zb.x), ya[j][3] *= silu_approx(zb.y);
          }
        };
        if (p.mimo_z.defined())
          gate_loop(std::true_type{});
        else
          gate_loop(std::false_type{});
      }
      if (!p.per_rank_out) {
        if (p.mimo_o.defined()) {  // phi (absent: 1)
#pragma unroll
          for (int j = 0; j < Cfg::kPH / 8; ++j) {
            const int x = hh * Cfg::kPH + j * 8 + 2 * tq;
            const float2 fa = *reinterpret_cast<const float2*>(phi_s + rA * P + x);
            const float2 fb = *reinterpret_cast<const float2*>(phi_s + rB * P + x);
            ya[j][0] *= fa.x, ya[j][1] *= fa.y, ya[j][2] *= fb.x, ya[j][3] *= fb.y;
          }
        }
        for (int o = 4; o < 4 * R; o <<= 1)  // ranks of one token: lanes gq ^ 1, 2, 4
#pragma unroll
          for (int j = 0; j < Cfg::kPH / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) ya[j][e] += __shfl_xor_sync(0xffffffffu, ya[j][e], o);
      }
      // Row offsets of `out` (per rank or rank-reduced), then the column pairs.
      const DTensor& O = p.out;
      const int xd = O.ndim - 1;
      auto row_off = [&](int t, int r) {
        const int64_t l = tok(c0 + t);
        return p.per_rank_out ? b * O.stride[0] + l * O.stride[1] + r * O.stride[2] + h * O.stride[3]
                              : b * O.stride[0] + l * O.stride[1] + h * O.stride[2];
      };
      const bool wa = tA < m && (p.per_rank_out || rA == 0);
      const bool wb = tB < m && (p.per_rank_out || rB == 0);
      const int64_t oa = wa ? row_off(tA, rA) : 0, ob = wb ? row_off(tB, rB) : 0;
#pragma unroll
      for (int j = 0; j < Cfg::kPH / 8; ++j) {
        const int x = hh * Cfg::kPH + j * 8 + 2 * tq;
        if (p.out_vec2) {
          __nv_bfloat16* ob16 = static_cast<__nv_bfloat16*>(O.data);
          if (wa) *reinterpret_cast<uint32_t*>(ob16 + oa + x) = pack_bf16(ya[j][0], ya[j][1]);
          if (wb) *reinterpret_cast<uint32_t*>(ob16 + ob + x) = pack_bf16(ya[j][2], ya[j][3]);
        } else {
          const int64_t xs = O.stride[xd];
          if (wa) dstore(O, oa + x * xs, ya[j][0]), dstore(O, oa + (x + 1) * xs, ya[j][1]);
          if (wb) dstore(O, ob + x * xs, ya[j][2]), dstore(O, ob + (x + 1) * xs, ya[j][3]);
        }
      }
    }
    if (m1 > 0) st_scal(scal_next);
  }
  cp_async_wait<0>();

  // ---- Segment end (state pass) or final states (last segment). The thread's fragment
  // coordinates again from a fresh read of its index (see tid_x_again).
  {
    const int tid2 = tid_x_again(), warp2 = tid2 >> 5, lane2 = tid2 & 31;
    const int xr = (warp2 % Cfg::kXT) * 16 + (lane2 >> 2), nc = (warp2 / Cfg::kXT) * Cfg::kNW + 2 * (lane2 & 3);
    auto frag_x = [&](int e) { return xr + (e >> 1) * 8; };
    auto frag_n = [&](int j, int e) { return nc + j * 8 + (e & 1); };
    if constexpr (kStates) {
#pragma unroll
      for (int j = 0; j < Cfg::kNW / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          sp.end_state[(static_cast<int64_t>(slot) * P + frag_x(e)) * N + frag_n(j, e)] = sreg[j][e];
      __syncthreads();
      if (tid2 < NA) sp.end_theta[static_cast<int64_t>(slot) * NA + tid2] = theta[tid2];
      if (tid2 == 32 * tc_decay_warp(NA)) sp.end_decay[slot] = decay_prod;  // its lane 0
    } else {
      // Coordinates again (not kept live across the loop).
      const TcCta e = tc_cta(p, sp, ctaid_x_again(), false);
      if (!e.last_seg) return;
      __syncthreads();  // theta final
      if (p.fin_ssm.defined() && e.n_seq > 0) {
#pragma unroll
        for (int j = 0; j < Cfg::kNW / 8; ++j)
#pragma unroll
          for (int ee = 0; ee < 4; ++ee)
            dstore(p.fin_ssm, e.s * p.fin_ssm.stride[0] + e.h * p.fin_ssm.stride[1] +
                                  frag_x(ee) * p.fin_ssm.stride[2] + frag_n(j, ee) * p.fin_ssm.stride[3],
                   sreg[j][ee]);
      }
      write_final_states(
          p, e.s, e.h, e.g, e.b, e.seq_end, e.n_seq, theta, [&](int, int) { return 0.f; }, tid2,
          kTcThreads, /*write_ssm=*/e.n_seq == 0);
    }
  }
}

// Absolute start states of pass 1's segments 1..last of one (sequence, head), where `last`
// starts pass 2's last segment: S_{j+1} = decay_j S_j + rot(theta_j) E_j, where E_j is segment
// j's local end state (segment 0's is absolute) and the rotation acts on the state's columns
// pair by pair like the rope of k. `sp` is pass 1's split; start angles are written for every
// j, start states only where pass 2's segments start (j a multiple of sp.sub).
template <int N, int P>
__global__ void __launch_bounds__(256) fwd_tc_combine(CoreParams p, SegParams sp) {
  const int sh = blockIdx.x;
  const int NA = p.NA, nseg = sp.nseg;
  // The split as fwd_tc_kernel sees it: pass 1's last segment, rounded down to a start of one
  // of pass 2's.
  const int last = tc_cta(p, sp, sh * nseg, false).last / sp.sub * sp.sub;
  if (last == 0) return;
  const int64_t slot0 = static_cast<int64_t>(sh) * nseg;
  for (int a = threadIdx.x; a < NA; a += blockDim.x) {
    double th = sp.end_theta[slot0 * NA + a];  // segment 0 ends at an absolute angle
    for (int j = 1; j <= last; ++j) {
      sp.start_theta[(slot0 + j) * NA + a] = th;  // all: the rotations below read them
      if (j < last) th = wrap_2pi(th + sp.end_theta[(slot0 + j) * NA + a]);
    }
  }
  // The start angles are read back from global memory (visible to the block after the
  // barrier), not kept in shared memory: nseg * NA doubles would exceed its limit on long
  // sequences split finely.
  __syncthreads();
  for (int i = threadIdx.x; i < P * N; i += blockDim.x) {
    const int x = i / N, n = i % N;
    // Rope pair of column n: angle index, role and partner column (none: unrotated).
    int ia = -1, partner = n;
    bool first = true;
    if (p.interleaved) {
      if ((n >> 1) < NA) ia = n >> 1, partner = n ^ 1, first = (n & 1) == 0;
    } else {
      const int half = N / 2;
      if (n < NA)
        ia = n, partner = n + half, first = true;
      else if (n >= half && n - half < NA)
        ia = n - half, partner = n - half, first = false;
    }
    float S = sp.end_state[slot0 * P * N + i];
    for (int j = 1; j <= last; ++j) {
      if (j % sp.sub == 0) sp.start_state[(slot0 + j) * P * N + i] = S;
      if (j == last) break;
      const float* E = sp.end_state + (slot0 + j) * P * N + static_cast<int64_t>(x) * N;
      float e = E[n];
      if (ia >= 0) {
        float sn, cs;
        __sincosf(static_cast<float>(sp.start_theta[(slot0 + j) * NA + ia]), &sn, &cs);
        const float self = E[n], other = E[partner];
        e = first ? self * cs - other * sn : other * sn + self * cs;
      }
      S = sp.end_decay[slot0 + j] * S + e;
    }
  }
}

}  // namespace mamba3::cuda
