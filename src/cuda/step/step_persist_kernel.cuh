// Decode step, persistent (DESIGN.md §2.4): the common case of step_fast_kernel.cuh (fp32 float4
// state rows, N in {64, 128}, P a multiple of 16 up to 128, R in {1, 2, 4, 8}) when q, k, v, z
// and trap share one dtype T (bf16, fp16 or fp32), every other tensor is fp32 and every offset
// fits in 32 bits (step_persist_params). Same math, operation for operation, as
// step_fast_kernel; what changes is how the work is laid out:
//   - a grid of at most (CTAs per SM x SMs) CTAs walks the (batch, head) items with a stride of
//     the grid. While a CTA computes item i it already has item i + grid in flight: the state
//     into the second of two shared-memory buffers (cp.async), every other input of the item
//     into registers. So each SM always has state bytes in flight, instead of a latency chain
//     of load, prologue, barrier, compute, epilogue per CTA (ncu, H200, 2026-11-29: a CTA of
//     the old kernel lived ~17 us for 64 KB of state traffic, 60.9 % of copy bandwidth);
//   - the prologue is compile-time typed with 32-bit offsets (the old one dispatched on each
//     tensor's dtype at run time and walked int64 strides: ~1450 of its ~1950 instructions per
//     warp). A thread that loads a rope pair of q and k rotates it itself (one thread per pair,
//     the angle computed by the threads that use it, in double as before), writes the rotated
//     k as the final k state and its old k as k_prev; a thread that loads v, v_prev and psi of
//     a (rank, row) writes the row's coefficients. Each final k, v and angle state is written by
//     the thread that read the old value at the same address, so in-place states need no
//     barrier between the two.
// The state loop and the epilogue are step_fast_kernel's; results are bitwise those of
// step_fast_kernel where the compiler contracts the same products (the emulated test checks it).
#pragma once

// Not step_fast_kernel.cuh: it includes the general step_kernel, a __global__ function that one
// translation unit (dispatch.cu) defines, and this header is also compiled per dtype.
#include "cuda/common/async_copy.cuh"
#include "cuda/common/layer_io.cuh"

namespace mamba3::cuda {

inline constexpr int kPersistMaxP = 128;

// The shapes the persistent kernel serves: those of step_fast_ok (step_fast_kernel.cuh).
inline bool step_persist_shape_ok(const CoreParams& p) {
  return p.state_vec4 && p.init_ssm.defined() && p.fin_ssm.defined() &&
         (p.N == 64 || p.N == 128) && p.P % 16 == 0 && p.P <= kPersistMaxP &&
         (p.R == 1 || p.R == 2 || p.R == 4 || p.R == 8);
}

// Typed pointers and 32-bit element strides of one decode step, built on the host from the
// validated CoreParams (step_persist_params). Absent optional tensors have null pointers; an
// absent axis (SISO layouts) has stride 0.
struct StepPersistParams {
  const void* q;      // (B, R, G, N) dtype T
  const void* k;      // (B, R, G, N) dtype T
  const void* v;      // (B, H, P) dtype T
  const void* z;      // (B, H, P) dtype T, optional
  const void* trap;   // (B, H) dtype T
  const float* adt;   // (B, H)
  const float* dt;    // (B, H)
  const float* angles;  // (B, H, NA)
  const float* q_bias;  // (H, R, N)
  const float* k_bias;  // (H, R, N)
  const float* d;       // (H,), optional
  const float* mimo_v;  // (H, R, P), optional (psi)
  const float* mimo_z;  // (H, R, P), optional (zeta)
  const float* mimo_o;  // (H, R, P), optional (phi)
  const float* norm_weight;  // (H, P), optional
  float* angle;  // state (B, H, NA), in place
  float* ssm;    // state (B, H, P, N), in place, float4 rows
  float* kst;    // state (B, R, H, N), in place
  float* vst;    // state (B, H, P), in place
  void* out;     // (B, H, P) or per rank (B, R, H, P), dtype out_dtype
  DType out_dtype;
  int q_b, q_r, q_g, q_n, k_b, k_r, k_g, k_n;
  int v_b, v_h, v_x, z_b, z_h, z_x;
  int trap_b, trap_h, adt_b, adt_h, dt_b, dt_h, ang_b, ang_h, ang_i;
  int qb_h, qb_r, qb_n, kb_h, kb_r, kb_n, d_h;
  int mv_h, mv_r, mv_x, mz_h, mz_r, mz_x, mo_h, mo_r, mo_x, nw_h, nw_x;
  int sa_b, sa_h, sa_i, ss_b, ss_h, ss_x, sk_b, sk_r, sk_h, sk_n, sv_b, sv_h, sv_x;
  int o_b, o_r, o_h, o_x;
  int items, H, hpg, P, NA;
  bool interleaved, per_rank_out;
  float eps;
};

// Shared memory (floats): two state buffers (P*N each); k_prev, k_hat, q_hat (R*N each; float4
// chunks); per (rank, row) cb, cg, dv, y (R*P each); rstd (R, padded to a multiple of 4); two
// output-stage buffers of z, norm weight (P each), zeta, phi (R*P each).
inline size_t step_persist_smem_bytes(int N, int P, int R) {
  return sizeof(float) *
         (2 * P * N + 3 * R * N + 4 * R * P + (R + 3) / 4 * 4 + 2 * (2 * P + 2 * R * P));
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Read-only inputs (q, k, v, z, trap and the fp32 parameters) through the non-coherent cache.
template <typename T>
__device__ __forceinline__ float ld_in(const void* base, int off) {
  return to_float(__ldg(static_cast<const T*>(base) + off));
}

__device__ __forceinline__ void store_out(void* base, DType dt, int off, float v) {
  switch (dt) {
    case DType::kBF16: static_cast<__nv_bfloat16*>(base)[off] = __float2bfloat16_rn(v); break;
    case DType::kF16: static_cast<__half*>(base)[off] = __float2half_rn(v); break;
    case DType::kF64: static_cast<double*>(base)[off] = static_cast<double>(v); break;
    default: static_cast<float*>(base)[off] = v; break;
  }
}

// CTAs per SM the registers must allow: what shared memory allows at P = 64, N = 128 (70 KB per
// CTA at R <= 2: 3; 81-95 KB at R = 4, 8: 2). At 256 threads that caps R <= 2 at 80 registers
// and R = 4 at 128; R = 8 at 256 threads spilled 16 bytes at 128, so it gets 1 (rare shape).
template <int R, int kThreads>
inline constexpr int kPersistMinCtas = R <= 2 ? 3 : (R == 8 && kThreads == 256) ? 1 : 2;

template <typename T, int R, int N, int kThreads>
__global__ void __launch_bounds__(kThreads, kPersistMinCtas<R, kThreads>)
    step_persist_kernel(StepPersistParams sp) {
  constexpr int kCpr = N / 4;                        // float4 chunks per state row
  constexpr int kRowsPerPass = kThreads / kCpr;      // rows per pass of the CTA
  constexpr int kHalf = N / 2;
  // As step_fast_kernel, but k_prev and k_hat in registers for R = 1 only: at R = 2 they made
  // the 80 registers of 3 CTAs of 256 threads spill (16 bytes).
  constexpr bool kRegK = R == 1, kRegQ = R <= 4;
  // Rope-pair units (rank r, pair j < N/2) and (rank, row) units per thread. The row units
  // start where the pair units end (mod the CTA), so a CTA with fewer pair units than threads
  // (R = 1) spreads the two kinds over different threads.
  constexpr int kPairSlots = (R * kHalf + kThreads - 1) / kThreads;
  constexpr int kRowSlots = (R * kPersistMaxP + kThreads - 1) / kThreads;
  constexpr int kRowShift = (R * kHalf) % kThreads;
#ifdef MAMBA3_CUDA_EMU
  float* sm = ::m3emu::dynamic_smem();
#else
  extern __shared__ float4 persist_sm4[];
  float* sm = reinterpret_cast<float*>(persist_sm4);
#endif
  const int P = sp.P, NA = sp.NA;
  float* sst0 = sm;  // two state buffers, (P, N) row-major each
  float* kp = sst0 + 2 * P * N;
  float* kh = kp + R * N;
  float* qh = kh + R * N;
  float* cb = qh + R * N;
  float* cg = cb + R * P;
  float* dv = cg + R * P;
  float* y = dv + R * P;
  float* rstd = y + R * P;
  float* ob0 = rstd + (R + 3) / 4 * 4;  // two output-stage buffers: zs (P), wn (P), zeta (R*P), phi (R*P)
  const int ob_size = 2 * P + 2 * R * P;

  const int tid = threadIdx.x;
  const int c = tid % kCpr, x0 = tid / kCpr;
  const int JP = P / kRowsPerPass;  // rows per thread

  // This thread's units, fixed for the whole kernel.
  int pr_r[kPairSlots], pr_j[kPairSlots], pr_n0[kPairSlots], pr_n1[kPairSlots];
#pragma unroll
  for (int s = 0; s < kPairSlots; ++s) {
    const int u = tid + s * kThreads;
    pr_r[s] = u < R * kHalf ? u / kHalf : -1;
    pr_j[s] = u % kHalf;
    pr_n0[s] = sp.interleaved ? 2 * pr_j[s] : pr_j[s];
    pr_n1[s] = sp.interleaved ? 2 * pr_j[s] + 1 : pr_j[s] + kHalf;
  }
  int rw_r[kRowSlots], rw_x[kRowSlots];
#pragma unroll
  for (int s = 0; s < kRowSlots; ++s) {
    const int i = (tid + kThreads - kRowShift) % kThreads + s * kThreads;
    rw_r[s] = i < R * P ? i / P : -1;
    rw_x[s] = i % P;
  }

  // One item's inputs in registers: the prefetch (load) and the staging into shared memory
  // (stage) are separate, so a CTA loads item i + grid before it computes item i.
  struct Item {
    int b, h;
    float adt, dt, trap, dskip;
    float q0[kPairSlots], q1[kPairSlots], k0[kPairSlots], k1[kPairSlots];
    float kp0[kPairSlots], kp1[kPairSlots], ang[kPairSlots], th0[kPairSlots];
    float v[kRowSlots], vp[kRowSlots], psi[kRowSlots], zeta[kRowSlots], phi[kRowSlots];
    float z[kRowSlots], wn[kRowSlots];
  };
  auto load = [&](int item, Item& it) {
    const int b = item / sp.H, h = item % sp.H, g = h / sp.hpg;
    it.b = b, it.h = h;
    it.adt = __ldg(sp.adt + b * sp.adt_b + h * sp.adt_h);
    it.dt = __ldg(sp.dt + b * sp.dt_b + h * sp.dt_h);
    it.trap = ld_in<T>(sp.trap, b * sp.trap_b + h * sp.trap_h);
    it.dskip = sp.d ? __ldg(sp.d + h * sp.d_h) : 0.f;
#pragma unroll
    for (int s = 0; s < kPairSlots; ++s) {
      const int r = pr_r[s], j = pr_j[s], n0 = pr_n0[s], n1 = pr_n1[s];
      if (r < 0) continue;
      const int qo = b * sp.q_b + r * sp.q_r + g * sp.q_g, ko = b * sp.k_b + r * sp.k_r + g * sp.k_g;
      const int qbo = h * sp.qb_h + r * sp.qb_r, kbo = h * sp.kb_h + r * sp.kb_r;
      it.q0[s] = ld_in<T>(sp.q, qo + n0 * sp.q_n) + __ldg(sp.q_bias + qbo + n0 * sp.qb_n);
      it.q1[s] = ld_in<T>(sp.q, qo + n1 * sp.q_n) + __ldg(sp.q_bias + qbo + n1 * sp.qb_n);
      it.k0[s] = ld_in<T>(sp.k, ko + n0 * sp.k_n) + __ldg(sp.k_bias + kbo + n0 * sp.kb_n);
      it.k1[s] = ld_in<T>(sp.k, ko + n1 * sp.k_n) + __ldg(sp.k_bias + kbo + n1 * sp.kb_n);
      const int sko = b * sp.sk_b + r * sp.sk_r + h * sp.sk_h;
      it.kp0[s] = sp.kst[sko + n0 * sp.sk_n];
      it.kp1[s] = sp.kst[sko + n1 * sp.sk_n];
      if (j < NA) {
        it.ang[s] = __ldg(sp.angles + b * sp.ang_b + h * sp.ang_h + j * sp.ang_i);
        it.th0[s] = sp.angle[b * sp.sa_b + h * sp.sa_h + j * sp.sa_i];
      }
    }
#pragma unroll
    for (int s = 0; s < kRowSlots; ++s) {
      const int r = rw_r[s], x = rw_x[s];
      if (r < 0) continue;
      it.v[s] = ld_in<T>(sp.v, b * sp.v_b + h * sp.v_h + x * sp.v_x);
      it.vp[s] = sp.vst[b * sp.sv_b + h * sp.sv_h + x * sp.sv_x];
      it.psi[s] = sp.mimo_v ? __ldg(sp.mimo_v + h * sp.mv_h + r * sp.mv_r + x * sp.mv_x) : 1.f;
      it.zeta[s] = sp.mimo_z ? __ldg(sp.mimo_z + h * sp.mz_h + r * sp.mz_r + x * sp.mz_x) : 1.f;
      it.phi[s] = sp.mimo_o ? __ldg(sp.mimo_o + h * sp.mo_h + r * sp.mo_r + x * sp.mo_x) : 1.f;
      if (r == 0) {
        it.z[s] = sp.z ? ld_in<T>(sp.z, b * sp.z_b + h * sp.z_h + x * sp.z_x) : 0.f;
        it.wn[s] = sp.norm_weight ? __ldg(sp.norm_weight + h * sp.nw_h + x * sp.nw_x) : 1.f;
      }
    }
  };
  auto load_state = [&](const Item& it, float* dst) {
    const float* src = sp.ssm + it.b * sp.ss_b + it.h * sp.ss_h;
    for (int i = tid; i < P * kCpr; i += kThreads)
      cp_async16(dst + i * 4, src + (i / kCpr) * sp.ss_x + (i % kCpr) * 4);
    cp_async_commit();
  };
  // Rotated q and k, k_prev, the row coefficients and the output-stage values of `it` into
  // shared memory; the final k, v and angle states of `it` to global memory (each by the thread
  // that read the old value at that address). Returns alpha.
  auto stage = [&](const Item& it, float* ob) -> float {
    const float dlt = it.dt;
    const float lam = sigmoidf_(it.trap);
    const float alpha = expf(it.adt);
    const float beta = (1.f - lam) * dlt * alpha, gam = lam * dlt;
#pragma unroll
    for (int s = 0; s < kPairSlots; ++s) {
      const int r = pr_r[s], j = pr_j[s], n0 = pr_n0[s], n1 = pr_n1[s];
      if (r < 0) continue;
      float q0 = it.q0[s], q1 = it.q1[s], k0 = it.k0[s], k1 = it.k1[s];
      if (j < NA) {
        const double theta_new = wrap_2pi(static_cast<double>(it.th0[s]) +
                                          static_cast<double>(static_cast<float>(kPiD) *
                                                              tanhf(it.ang[s]) * dlt));
        // theta is in [0, 2 pi): the SFU sincos is accurate to ~4e-7 there and has no slow path.
        float sn, cs;
        __sincosf(static_cast<float>(theta_new), &sn, &cs);
        const float a = q0, bq = q1, ak = k0, bk = k1;
        q0 = a * cs - bq * sn, q1 = a * sn + bq * cs;
        k0 = ak * cs - bk * sn, k1 = ak * sn + bk * cs;
        if (r == 0)
          sp.angle[it.b * sp.sa_b + it.h * sp.sa_h + j * sp.sa_i] = static_cast<float>(theta_new);
      }
      qh[r * N + n0] = q0, qh[r * N + n1] = q1;
      kh[r * N + n0] = k0, kh[r * N + n1] = k1;
      kp[r * N + n0] = it.kp0[s], kp[r * N + n1] = it.kp1[s];
      const int sko = it.b * sp.sk_b + r * sp.sk_r + it.h * sp.sk_h;
      sp.kst[sko + n0 * sp.sk_n] = k0;
      sp.kst[sko + n1 * sp.sk_n] = k1;
    }
#pragma unroll
    for (int s = 0; s < kRowSlots; ++s) {
      const int r = rw_r[s], x = rw_x[s];
      if (r < 0) continue;
      const int i = r * P + x;
      cb[i] = beta * it.vp[s] * it.psi[s];
      cg[i] = gam * it.v[s] * it.psi[s];
      dv[i] = it.dskip * it.v[s] * it.psi[s];
      ob[2 * P + i] = it.zeta[s];
      ob[2 * P + R * P + i] = it.phi[s];
      if (r == 0) {
        ob[x] = it.z[s];
        ob[P + x] = it.wn[s];
        sp.vst[it.b * sp.sv_b + it.h * sp.sv_h + x * sp.sv_x] = it.v[s];
      }
    }
    return alpha;
  };

  int item = blockIdx.x;
  Item cur;
  load(item, cur);
  load_state(cur, sst0);
  // Ranks r > 0 read the old angle and v states that stage() of rank 0 overwrites (in place);
  // for later items the barrier after the state loop separates the two.
  __syncthreads();
  float alpha = stage(cur, ob0);
  cp_async_wait<0>();
  for (int buf = 0; item < sp.items; item += gridDim.x, buf ^= 1) {
    __syncthreads();  // item's state, k/q chunks and coefficients are in shared memory
    const int b = cur.b, h = cur.h;
    float* sst = sst0 + buf * P * N;
    float* ob = ob0 + buf * ob_size;
    const int next = item + gridDim.x;
    Item nxt;
    if (next < sp.items) {
      load(next, nxt);
      load_state(nxt, sst0 + (buf ^ 1) * P * N);
    }

    // The state loop of step_fast_kernel.
    float4 kpr[kRegK ? R : 1], khr[kRegK ? R : 1], qhr[kRegQ ? R : 1];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if constexpr (kRegK) {
        kpr[r] = reinterpret_cast<const float4*>(kp + r * N)[c];
        khr[r] = reinterpret_cast<const float4*>(kh + r * N)[c];
      }
      if constexpr (kRegQ) qhr[r] = reinterpret_cast<const float4*>(qh + r * N)[c];
    }
    auto chunk = [&](const float* smem, int r) {
      return reinterpret_cast<const float4*>(smem + r * N)[c];
    };
    float* dst = sp.ssm + b * sp.ss_b + h * sp.ss_h + x0 * sp.ss_x + 4 * c;
    const int dst_step = kRowsPerPass * sp.ss_x;
    const float4* srow = reinterpret_cast<const float4*>(sst) + x0 * kCpr + c;
#pragma unroll 4
    for (int j = 0; j < JP; ++j) {
      const int x = x0 + j * kRowsPerPass;
      const float4 sv = srow[j * kRowsPerPass * kCpr];
      float4 o = make_float4(alpha * sv.x, alpha * sv.y, alpha * sv.z, alpha * sv.w);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float fb = cb[r * P + x], fg = cg[r * P + x];
        const float4 a = kRegK ? kpr[r] : chunk(kp, r), k = kRegK ? khr[r] : chunk(kh, r);
        o.x += fb * a.x + fg * k.x;
        o.y += fb * a.y + fg * k.y;
        o.z += fb * a.z + fg * k.z;
        o.w += fb * a.w + fg * k.w;
      }
      *reinterpret_cast<float4*>(dst + j * dst_step) = o;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 q = kRegQ ? qhr[r] : chunk(qh, r);
        float t = o.x * q.x + o.y * q.y + o.z * q.z + o.w * q.w;
#pragma unroll
        for (int off = kCpr >> 1; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
        if (c == 0) y[r * P + x] = t + dv[r * P + x];
      }
    }
    __syncthreads();  // y complete; k/q chunks and coefficients free for the next item

    // Output stage of step_fast_kernel: RMSNorm factors, gate, rank reduction.
    if (sp.norm_weight) {
      rows_rstd(y, P, R, P, sp.eps, rstd, tid >> 5, tid & 31, kThreads / 32);
      __syncthreads();
    }
    for (int x = tid; x < P; x += kThreads) {
      const float z = ob[x], wnx = ob[P + x];
      const float* zeta = ob + 2 * P;
      const float* phi = zeta + R * P;
      float acc = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float yn = y[r * P + x];
        if (sp.norm_weight) yn *= rstd[r] * wnx;
        float gate = 1.f;
        if (sp.z) {
          const float u = z * zeta[r * P + x];
          gate = u * sigmoidf_(u);
        }
        if (sp.per_rank_out)
          store_out(sp.out, sp.out_dtype, b * sp.o_b + r * sp.o_r + h * sp.o_h + x * sp.o_x,
                    yn * gate);
        else
          acc += phi[r * P + x] * yn * gate;
      }
      if (!sp.per_rank_out)
        store_out(sp.out, sp.out_dtype, b * sp.o_b + h * sp.o_h + x * sp.o_x, acc);
    }

    if (next < sp.items) {
      cur = nxt;
      alpha = stage(cur, ob0 + (buf ^ 1) * ob_size);
      cp_async_wait<0>();
    }
  }
}

}  // namespace mamba3::cuda
