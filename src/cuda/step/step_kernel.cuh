// Decode step (DESIGN.md §2.4): one token for every (batch, head); one CTA of kStepThreads per
// (batch, head). Bandwidth-bound by design: each thread streams its rows of the fp32 state once
// (read, update, write back in place) while q_hat, k_hat, k_prev and psi sit in shared memory.
// Reads every old state of its (batch, head) before the barrier that precedes any state write,
// so the initial and final state buffers may alias (they do for a step).
#pragma once

#include "cuda/common/async_copy.cuh"
#include "cuda/common/layer_io.cuh"

namespace mamba3::cuda {

inline constexpr int kStepThreads = 256;

// Shared memory (floats): q_hat, k_hat, k_prev (R*N each, first: 16-byte aligned rows for
// float4 reads); cos, sin (NA); v, v_prev (P); psi, zeta, phi (R*P each); norm weight (P);
// y (R*P); rstd (R).
inline size_t step_smem_bytes(int N, int P, int R, int NA, bool stage_state) {
  return sizeof(float) * ((stage_state ? P * N : 0) + 3 * R * N + 2 * NA + 3 * P + 4 * R * P + R);
}

inline constexpr int kStepVec = 8;  // float4 state chunks in flight per thread

// S_new = alpha S + sum_r (cb_r k_prev_r + cg_r k_hat_r) for one row x and 4 columns n..n+3;
// returns the new values and adds their dot with q_hat_r into part[r].
__device__ __forceinline__ float4 step_row4(float4 s, int x, int n, int N, int P, int R,
                                            float alpha, float beta, float gam, const float* kp,
                                            const float* kh, const float* qh, const float* v,
                                            const float* vp, const float* psi, float* part) {
  float4 o = make_float4(alpha * s.x, alpha * s.y, alpha * s.z, alpha * s.w);
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    if (r >= R) break;
    const float cb = beta * vp[x] * psi[r * P + x], cg = gam * v[x] * psi[r * P + x];
    const float4 a = *reinterpret_cast<const float4*>(kp + r * N + n);
    const float4 k = *reinterpret_cast<const float4*>(kh + r * N + n);
    o.x += cb * a.x + cg * k.x;
    o.y += cb * a.y + cg * k.y;
    o.z += cb * a.z + cg * k.z;
    o.w += cb * a.w + cg * k.w;
  }
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    if (r >= R) break;
    const float4 q = *reinterpret_cast<const float4*>(qh + r * N + n);
    part[r] = o.x * q.x + o.y * q.y + o.z * q.z + o.w * q.w;
  }
  return o;
}

// The end of a decode step of (sequence s, head h), shared by both step kernels, called after
// the barrier that follows every read of the old states: the new k, v and angle states, then
// the RMSNorm factors of the R rows of y (ready after the barrier inside).
__device__ __forceinline__ void step_store_states_and_rstd(const CoreParams& p, int s, int h, int R,
                                                           int N, int P, const float* kh,
                                                           const float* v, double theta_new,
                                                           const float* y, float* rstd, int tid,
                                                           int nthreads) {
  if (p.fin_k.defined())
    for (int i = tid; i < R * N; i += nthreads)
      dstore(p.fin_k, sk_off(p.fin_k, s, i / N, h, i % N), kh[i]);
  if (p.fin_v.defined())
    for (int i = tid; i < P; i += nthreads)
      dstore(p.fin_v, s * p.fin_v.stride[0] + h * p.fin_v.stride[1] + i * p.fin_v.stride[2], v[i]);
  if (p.fin_angle.defined() && tid < p.NA)
    dstore_f64(p.fin_angle, s * p.fin_angle.stride[0] + h * p.fin_angle.stride[1] +
                                tid * p.fin_angle.stride[2],
               theta_new);
  if (p.norm_weight.defined()) {
    rows_rstd(y, P, R, P, p.eps, rstd, tid >> 5, tid & 31, nthreads / 32);
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kStepThreads, 2) step_kernel(CoreParams p) {
#ifdef MAMBA3_CUDA_EMU
  float* sm = ::m3emu::dynamic_smem();
#else
  extern __shared__ float sm[];
#endif
  const int N = p.N, P = p.P, R = p.R, NA = p.NA;
  // With float4 state rows, the state is copied into shared memory asynchronously at entry, so
  // its bytes are in flight while the prologue (angles, rotation, barriers) runs.
  float* sstate = sm;
  float* qh = sm + (p.state_vec4 ? p.P * p.N : 0);
  float* kh = qh + R * N;
  float* kp = kh + R * N;
  float* cosv = kp + R * N;
  float* sinv = cosv + NA;
  float* v = sinv + NA;
  float* vp = v + P;
  float* psi = vp + P;
  float* zeta = psi + R * P;
  float* phi = zeta + R * P;
  float* wn = phi + R * P;
  float* y = wn + P;
  float* rstd = y + R * P;

  const int b = blockIdx.x / p.H, h = blockIdx.x % p.H, g = h / p.hpg, s = b;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool has_init = p.init_ssm.defined();
  if (p.state_vec4) {
    const float* src0 = static_cast<const float*>(p.init_ssm.data) + s * p.init_ssm.stride[0] +
                        h * p.init_ssm.stride[1];
    const int cpr0 = N / 4;
    for (int idx = tid; idx < P * cpr0; idx += kStepThreads)
      cp_async16(sstate + idx * 4, src0 + (idx / cpr0) * p.init_ssm.stride[2] + (idx % cpr0) * 4);
  }

  const float dlt = dload(p.dt, b * p.dt.stride[0] + h * p.dt.stride[1]);
  const float lam = sigmoidf_(dload(p.trap, b * p.trap.stride[0] + h * p.trap.stride[1]));
  const float alpha = expf(dload(p.adt, b * p.adt.stride[0] + h * p.adt.stride[1]));
  const float beta = (1.f - lam) * dlt * alpha, gam = lam * dlt;

  // Angles advance; the new angle is stored after the barrier (it may alias the old one).
  double theta_new = 0.0;
  if (tid < NA) {
    const double th0 =
        has_init ? dload_f64(p.init_angle, s * p.init_angle.stride[0] + h * p.init_angle.stride[1] +
                                               tid * p.init_angle.stride[2])
                 : 0.0;
    const float a = dload(p.angles, b * p.angles.stride[0] + h * p.angles.stride[2] +
                                        tid * p.angles.stride[3]);
    theta_new = wrap_2pi(th0 + static_cast<double>(static_cast<float>(kPiD) * tanhf(a) * dlt));
    // theta is in [0, 2 pi): the SFU sincos is accurate to ~4e-7 there and has no slow path.
    __sincosf(static_cast<float>(theta_new), &sinv[tid], &cosv[tid]);
  }
  for (int i = tid; i < P; i += kStepThreads) {
    v[i] = dload(p.v, b * p.v.stride[0] + h * p.v.stride[2] + i * p.v.stride[3]);
    vp[i] = has_init ? dload(p.init_v, s * p.init_v.stride[0] + h * p.init_v.stride[1] +
                                           i * p.init_v.stride[2])
                     : 0.f;
  }
  load_head_params(p, h, psi, zeta, phi, wn, tid, kStepThreads);
  for (int i = tid; i < R * N; i += kStepThreads) {
    const int r = i / N, n = i % N;
    kp[i] = has_init ? dload(p.init_k, sk_off(p.init_k, s, r, h, n)) : 0.f;
  }
  __syncthreads();
  for (int i = tid; i < R * N; i += kStepThreads) {
    const int r = i / N, n = i % N;
    auto qx = [&](int m) {
      return dload(p.q, qk_off(p.q, b, 0, r, g, m)) + dload(p.q_bias, bias_off(p.q_bias, h, r, m));
    };
    auto kx = [&](int m) {
      return dload(p.k, qk_off(p.k, b, 0, r, g, m)) + dload(p.k_bias, bias_off(p.k_bias, h, r, m));
    };
    qh[i] = rope_element(p.interleaved, N, NA, n, cosv, sinv, qx);
    kh[i] = rope_element(p.interleaved, N, NA, n, cosv, sinv, kx);
  }
  __syncthreads();

  const float dskip = p.d.defined() ? dload(p.d, h * p.d.stride[0]) : 0.f;
  constexpr int kWarps = kStepThreads / 32;
  if (p.state_vec4) {
    cp_async_wait_all();
    __syncthreads();
    // float4 chunks, row-major: a row is cpr = N/4 consecutive lanes (cpr divides 32), so the
    // y dot products reduce inside aligned lane segments. kStepVec loads in flight per thread.
    const int cpr = N / 4, total = P * cpr;
    float* dst = static_cast<float*>(p.fin_ssm.data) + s * p.fin_ssm.stride[0] +
                 h * p.fin_ssm.stride[1];
    const int64_t drow = p.fin_ssm.stride[2];
    for (int base = 0; base < total; base += kStepThreads * kStepVec) {
      float4 reg[kStepVec];
#pragma unroll
      for (int u = 0; u < kStepVec; ++u) {
        const int idx = base + u * kStepThreads + tid;
        if (idx < total) reg[u] = *reinterpret_cast<const float4*>(sstate + idx * 4);
      }
#pragma unroll
      for (int u = 0; u < kStepVec; ++u) {
        const int seg_base = base + u * kStepThreads + (tid & ~31);
        if (seg_base >= total) break;  // whole warp past the end (total is a multiple of 32 or
                                       // the tail lanes below contribute zeros)
        const int idx = base + u * kStepThreads + tid;
        float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        const int x = idx / cpr, n = (idx % cpr) * 4;
        if (idx < total) {
          const float4 o = step_row4(reg[u], x, n, N, P, R, alpha, beta, gam, kp, kh, qh, v, vp,
                                     psi, part);
          *reinterpret_cast<float4*>(dst + x * drow + n) = o;
        }
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          if (r >= R) break;
          float t = part[r];
          for (int off = cpr >> 1; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
          if (idx < total && (idx % cpr) == 0) y[r * P + x] = t + dskip * v[x] * psi[r * P + x];
        }
      }
    }
  } else {
    // Any layout and dtype: one warp per row x, lanes over n.
    for (int x = warp; x < P; x += kWarps) {
      float acc[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) acc[r] = 0.f;
      for (int n = lane; n < N; n += 32) {
        float sold = has_init ? dload(p.init_ssm, s * p.init_ssm.stride[0] + h * p.init_ssm.stride[1] +
                                                      x * p.init_ssm.stride[2] +
                                                      n * p.init_ssm.stride[3])
                              : 0.f;
        float snew = alpha * sold;
        for (int r = 0; r < R; ++r)
          snew += beta * vp[x] * psi[r * P + x] * kp[r * N + n] +
                  gam * v[x] * psi[r * P + x] * kh[r * N + n];
        if (p.fin_ssm.defined())
          dstore(p.fin_ssm, s * p.fin_ssm.stride[0] + h * p.fin_ssm.stride[1] +
                                x * p.fin_ssm.stride[2] + n * p.fin_ssm.stride[3],
                 snew);
#pragma unroll
        for (int r = 0; r < 8; ++r)
          if (r < R) acc[r] += snew * qh[r * N + n];
      }
#pragma unroll
      for (int r = 0; r < 8; ++r)
        if (r < R) {
          const float sum = warp_sum(acc[r]);
          if (lane == 0) y[r * P + x] = sum + dskip * v[x] * psi[r * P + x];
        }
    }
  }
  __syncthreads();

  step_store_states_and_rstd(p, s, h, R, N, P, kh, v, theta_new, y, rstd, tid, kStepThreads);
  // Output stage: gate, rank reduction (the RMSNorm factors are in rstd).
  for (int x = tid; x < P; x += kStepThreads)
    store_output(p, b, 0, h, x, &y[x], P, rstd, 1, zeta, phi, wn);
}

}  // namespace mamba3::cuda
