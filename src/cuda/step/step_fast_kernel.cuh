// Decode step for the common case (DESIGN.md §2.4): fp32 state with float4 rows (state_vec4),
// N in {64, 128}, P a multiple of 16 up to 128, R in {1, 2, 4, 8}; one CTA of kFastThreads per
// (batch, head). Bandwidth-bound by design, and built to stay so:
//   - the state is copied into shared memory with cp.async at entry, so its bytes are in flight
//     while the prologue (angles, rope, coefficients) runs; then every thread owns one float4
//     column chunk c and rows x0 + j * kRowsPerPass;
//   - the per-row coefficients (beta v_prev psi, gamma v psi, D v psi) are precomputed once per
//     (rank, row) in shared memory, and the thread's chunks of k_prev, k_hat and q_hat sit in
//     registers for R <= 4, so a state chunk costs one load, (1 + 2R) float4 FMAs, one store, an
//     R-fold dot and a shuffle reduction over the row's N / 4 lanes: ~10x fewer instructions than
//     the general kernel (step_kernel.cuh), whose instruction count bounded it (ncu, H200,
//     2026-11-29: 300 instructions per state float4, 30 % of DRAM bandwidth at batch 128).
// Reads every old value of its (batch, head) before any write of the same address (a thread
// rewrites only its own state chunks; k, v and angle states after a barrier), so the initial
// and final state buffers may alias (they do for a step).
#pragma once

#include "cuda/step/step_kernel.cuh"

namespace mamba3::cuda {

// Threads per CTA: 128 or 256, chosen per call (dispatch.cu: step_threads); 64 registers either
// way.

// Shared memory (floats): the state (P*N), q_hat, k_hat, k_prev, raw q, raw k (R*N each; the
// first three 16-byte aligned for float4 access); per (rank, row): cb, cg, dv, psi, zeta, phi, y (R*P each); v, v_prev, norm weight (P);
// cos, sin (NA); rstd (R).
inline size_t step_fast_smem_bytes(int N, int P, int R, int NA) {
  return sizeof(float) * (P * N + 5 * R * N + 7 * R * P + 4 * P + 2 * NA + R);
}

// Whether step_fast_kernel takes this call (else step_kernel).
inline bool step_fast_ok(const CoreParams& p) {
  return p.state_vec4 && p.init_ssm.defined() && p.fin_ssm.defined() &&
         (p.N == 64 || p.N == 128) && p.P % 16 == 0 && p.P <= 128 &&
         (p.R == 1 || p.R == 2 || p.R == 4 || p.R == 8);
}

template <int R, int N, int kFastThreads>
__global__ void __launch_bounds__(kFastThreads, 2048 / kFastThreads / 2) step_fast_kernel(CoreParams p) {
  constexpr int kCpr = N / 4;                           // float4 chunks per state row
  constexpr int kRowsPerPass = kFastThreads / kCpr;     // rows per pass of the CTA
  constexpr bool kRegK = R <= 2, kRegQ = R <= 4;        // see the register copies below
#ifdef MAMBA3_CUDA_EMU
  float* sm = ::m3emu::dynamic_smem();
#else
  extern __shared__ float4 sm4[];
  float* sm = reinterpret_cast<float*>(sm4);
#endif
  const int P = p.P, NA = p.NA;
  float* sst = sm;  // the state, (P, N) row-major
  float* qh = sst + P * N;
  float* kh = qh + R * N;
  float* kp = kh + R * N;
  float* qraw = kp + R * N;
  float* kraw = qraw + R * N;
  float* cb = kraw + R * N;
  float* cg = cb + R * P;
  float* dv = cg + R * P;
  float* psi = dv + R * P;
  float* zeta = psi + R * P;
  float* phi = zeta + R * P;
  float* y = phi + R * P;
  float* v = y + R * P;
  float* vp = v + P;
  float* wn = vp + P;
  float* zs = wn + P;
  float* cosv = zs + P;
  float* sinv = cosv + NA;
  float* rstd = sinv + NA;

  const int b = blockIdx.x / p.H, h = blockIdx.x % p.H, g = h / p.hpg, s = b;
  const int tid = threadIdx.x;
  const int c = tid % kCpr, x0 = tid / kCpr;
  const int JP = P / kRowsPerPass;  // rows per thread

  // The state of this (batch, head) is copied into shared memory with cp.async at entry, so its
  // bytes are in flight while the prologue runs, without holding registers (which bound the
  // CTAs per SM when the chunks were loaded into registers: 128 registers, 2 CTAs).
  {
    const float* src0 = static_cast<const float*>(p.init_ssm.data) + s * p.init_ssm.stride[0] +
                        h * p.init_ssm.stride[1];
    const int64_t rs = p.init_ssm.stride[2];
    for (int i = tid; i < P * kCpr; i += kFastThreads)
      cp_async16(sst + i * 4, src0 + (i / kCpr) * rs + (i % kCpr) * 4);
  }
  float* dst = static_cast<float*>(p.fin_ssm.data) + s * p.fin_ssm.stride[0] +
               h * p.fin_ssm.stride[1] + x0 * p.fin_ssm.stride[2] + 4 * c;
  const int64_t dst_step = kRowsPerPass * p.fin_ssm.stride[2];

  const float dlt = dload(p.dt, b * p.dt.stride[0] + h * p.dt.stride[1]);
  const float lam = sigmoidf_(dload(p.trap, b * p.trap.stride[0] + h * p.trap.stride[1]));
  const float alpha = expf(dload(p.adt, b * p.adt.stride[0] + h * p.adt.stride[1]));
  const float beta = (1.f - lam) * dlt * alpha, gam = lam * dlt;
  const float dskip = p.d.defined() ? dload(p.d, h * p.d.stride[0]) : 0.f;

  // Angles advance; the new angle is stored after the last barrier (it may alias the old one).
  double theta_new = 0.0;
  if (tid < NA) {
    const double th0 = dload_f64(p.init_angle, s * p.init_angle.stride[0] +
                                                   h * p.init_angle.stride[1] +
                                                   tid * p.init_angle.stride[2]);
    const float a = dload(p.angles, b * p.angles.stride[0] + h * p.angles.stride[2] +
                                        tid * p.angles.stride[3]);
    theta_new = wrap_2pi(th0 + static_cast<double>(static_cast<float>(kPiD) * tanhf(a) * dlt));
    // theta is in [0, 2 pi): the SFU sincos is accurate to ~4e-7 there and has no slow path.
    __sincosf(static_cast<float>(theta_new), &sinv[tid], &cosv[tid]);
  }
  for (int i = tid; i < P; i += kFastThreads) {
    v[i] = dload(p.v, b * p.v.stride[0] + h * p.v.stride[2] + i * p.v.stride[3]);
    vp[i] = dload(p.init_v, s * p.init_v.stride[0] + h * p.init_v.stride[1] + i * p.init_v.stride[2]);
    // The gate input too: the output stage then needs no global load of its own.
    zs[i] = p.z.defined() ? dload_ro(p.z, b * p.z.stride[0] + h * p.z.stride[2] + i * p.z.stride[3])
                          : 0.f;
  }
  load_head_params(p, h, psi, zeta, phi, wn, tid, kFastThreads);
  // Raw q + bias and k + bias are loaded in the same round of loads as everything above (the
  // rope needs the angles, so it runs after the barrier, from shared memory).
  for (int i = tid; i < R * N; i += kFastThreads) {
    const int r = i / N, n = i % N;
    kp[i] = dload(p.init_k, sk_off(p.init_k, s, r, h, n));
    qraw[i] = dload(p.q, qk_off(p.q, b, 0, r, g, n)) + dload(p.q_bias, bias_off(p.q_bias, h, r, n));
    kraw[i] = dload(p.k, qk_off(p.k, b, 0, r, g, n)) + dload(p.k_bias, bias_off(p.k_bias, h, r, n));
  }
  __syncthreads();
  for (int i = tid; i < R * N; i += kFastThreads) {
    const int r = i / N, n = i % N;
    qh[i] = rope_element(p.interleaved, N, NA, n, cosv, sinv, [&](int m) { return qraw[r * N + m]; });
    kh[i] = rope_element(p.interleaved, N, NA, n, cosv, sinv, [&](int m) { return kraw[r * N + m]; });
  }
  for (int i = tid; i < R * P; i += kFastThreads) {
    const int x = i % P;
    cb[i] = beta * vp[x] * psi[i];
    cg[i] = gam * v[x] * psi[i];
    dv[i] = dskip * v[x] * psi[i];
  }
  __syncthreads();

  // This thread's chunks of k_prev, k_hat (R <= 2) and q_hat (R <= 4) in registers; the rest is
  // read from shared memory per row (register budget of 4 CTAs per SM: 64).
  float4 kpr[kRegK ? R : 1], khr[kRegK ? R : 1], qhr[kRegQ ? R : 1];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if constexpr (kRegK) {
      kpr[r] = reinterpret_cast<const float4*>(kp + r * N)[c];
      khr[r] = reinterpret_cast<const float4*>(kh + r * N)[c];
    }
    if constexpr (kRegQ) qhr[r] = reinterpret_cast<const float4*>(qh + r * N)[c];
  }
  auto chunk = [&](const float* smem, int r) { return reinterpret_cast<const float4*>(smem + r * N)[c]; };

  cp_async_wait_all();
  __syncthreads();
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
  __syncthreads();

  step_store_states_and_rstd(p, s, h, R, N, P, kh, v, theta_new, y, rstd, tid, kFastThreads);
  // Output stage: gate, rank reduction (the RMSNorm factors are in rstd).
  for (int x = tid; x < P; x += kFastThreads)
    store_output_z(p, b, 0, h, x, zs[x], &y[x], P, rstd, 1, zeta, phi, wn);
}

}  // namespace mamba3::cuda
