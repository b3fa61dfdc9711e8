// Chunked prefill forward (DESIGN.md §2.5), a correctness-first SIMT version: one CTA per
// (sequence, head) walks its chunks in order, keeping the fp32 state S (P x N) in shared
// memory. A chunk is kRows = 64 rows (C = 64 / R tokens, row t*R + r). All products are fp32
// FMAs on the CUDA cores; tensor cores, TMA and sequence parallelism are the next steps
// (NOTES.md). Runtime N, P, R so the same kernel serves every shape that fits shared memory.
#pragma once

#include "cuda/common/layer_io.cuh"

namespace mamba3::cuda {

inline constexpr int kFwdThreads = 256;
inline constexpr int kRows = 64;

struct FwdSmem {
  // Offsets in floats; pitches pad rows by one word against bank conflicts.
  int qn, vp, ap;             // row pitches: N + 1, P + 1, kRows + 1
  int qh, kh, vr, s, a, y, scratch_floats, scal, theta, par, total_floats;
};

inline FwdSmem fwd_smem_layout(int N, int P, int NA) {
  FwdSmem m{};
  m.qn = N + 1, m.vp = P + 1, m.ap = kRows + 1;
  int o = 0;
  m.qh = o, o += kRows * m.qn;
  m.kh = o, o += kRows * m.qn;
  m.vr = o, o += kRows * m.vp;
  m.s = o, o += P * m.qn;
  // a and y share space with the rope cos/sin table of the chunk (used before them).
  const int ay = kRows * m.ap + kRows * m.vp;
  const int rope = 2 * kRows * NA;
  m.a = o, m.y = o + kRows * m.ap;
  m.scratch_floats = ay > rope ? ay : rope;
  o += m.scratch_floats;
  m.scal = o, o += 8 * kRows;   // cs, e, gam, w, fw, rstd, spare (per token or row)
  o = (o + 1) & ~1;             // 8-byte alignment for the float64 angles
  m.theta = o, o += 2 * 64;     // running angle, float64 (NA <= 64), as 2 floats each
  m.par = o, o += 3 * 8 * P + P;  // psi, zeta, phi (R <= 8 rows of P), norm weight (P)
  m.total_floats = o;
  return m;
}

__global__ void __launch_bounds__(kFwdThreads) fwd_kernel(CoreParams p, FwdSmem lay) {
  extern __shared__ float sm[];
  const int N = p.N, P = p.P, R = p.R, NA = p.NA, C = kRows / R;
  const int s = blockIdx.x / p.H, h = blockIdx.x % p.H, g = h / p.hpg;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  constexpr int kWarps = kFwdThreads / 32;
  int b = s, begin = 0, end = p.L;
  if (p.cu_seqlens) {
    b = 0;
    begin = p.cu_seqlens[s * p.cu_stride];
    end = p.cu_seqlens[(s + 1) * p.cu_stride];
  }
  const int n_tok = end - begin;
  float* Qh = sm + lay.qh;
  float* Kh = sm + lay.kh;
  float* Vr = sm + lay.vr;
  float* S = sm + lay.s;
  float* A = sm + lay.a;
  float* Y = sm + lay.y;
  float* cosv = sm + lay.a;            // (C, NA), aliases A/Y before they are computed
  float* sinv = cosv + kRows * NA;
  float* cs = sm + lay.scal;
  float* ex = cs + kRows;
  float* gam = ex + kRows;
  float* w = gam + kRows;
  float* fw = w + kRows;
  float* rstd = fw + kRows;
  double* theta = reinterpret_cast<double*>(sm + lay.theta);
  const bool has_init = p.init_ssm.defined();
  const float dskip = p.d.defined() ? dload(p.d, h * p.d.stride[0]) : 0.f;
  float* psi_s = sm + lay.par;
  float* zeta_s = psi_s + 8 * P;
  float* phi_s = zeta_s + 8 * P;
  float* wn_s = phi_s + 8 * P;
  load_head_params(p, h, psi_s, zeta_s, phi_s, wn_s, tid, kFwdThreads);
  __syncthreads();
  auto psi_at = [&](int r, int x) { return psi_s[r * P + x]; };
  auto lam_at = [&](int l) {
    return sigmoidf_(dload(p.trap, b * p.trap.stride[0] + h * p.trap.stride[1] + l * p.trap.stride[2]));
  };
  auto dt_at = [&](int l) {
    return dload(p.dt, b * p.dt.stride[0] + h * p.dt.stride[1] + l * p.dt.stride[2]);
  };

  // Initial state: S0 + (1 - lambda_0) dt_0 sum_r (v0 psi_r) k0_r^T, angle theta0.
  if (tid < NA)
    theta[tid] = has_init ? dload_f64(p.init_angle, s * p.init_angle.stride[0] +
                                                        h * p.init_angle.stride[1] +
                                                        tid * p.init_angle.stride[2])
                          : 0.0;
  const float sg0 = n_tok > 0 && has_init ? (1.f - lam_at(begin)) * dt_at(begin) : 0.f;
  for (int i = tid; i < P * N; i += kFwdThreads)
    S[(i / N) * lay.qn + i % N] = initial_state_elem(p, s, h, i / N, i % N, sg0, psi_s);
  __syncthreads();

  for (int c0 = 0; c0 < n_tok; c0 += C) {
    const int m = min(C, n_tok - c0), mr = m * R;
    // Per-token scalars and the chunk-local cumulative decay.
    if (tid < m) {
      const int l = begin + c0 + tid;
      const float lam = lam_at(l), dl = dt_at(l);
      gam[tid] = lam * dl;
      const float sg = (c0 + tid + 1 < n_tok) ? (1.f - lam_at(l + 1)) * dt_at(l + 1) : 0.f;
      w[tid] = lam * dl + sg;
      cs[tid] = dload(p.adt, b * p.adt.stride[0] + h * p.adt.stride[1] + l * p.adt.stride[2]);
    }
    __syncthreads();
    if (tid == 0)
      for (int t = 1; t < m; ++t) cs[t] += cs[t - 1];
    // Angles: a sequential float64 walk per angle index; cos/sin of each token.
    if (tid < NA) {
      double th = theta[tid];
      for (int t = 0; t < m; ++t) {
        const int l = begin + c0 + t;
        const float a = dload(p.angles, b * p.angles.stride[0] + l * p.angles.stride[1] +
                                            h * p.angles.stride[2] + tid * p.angles.stride[3]);
        th = wrap_2pi(th + static_cast<double>(static_cast<float>(kPiD) * tanhf(a) * dt_at(l)));
        sincosf(static_cast<float>(th), &sinv[t * NA + tid], &cosv[t * NA + tid]);
      }
      theta[tid] = th;
    }
    __syncthreads();
    if (tid < m) {
      ex[tid] = expf(cs[tid]);
      fw[tid] = expf(cs[m - 1] - cs[tid]) * w[tid];
    }
    // Rotated, biased q and k rows; v * psi rows. Rows past the sequence end are zero.
    for (int i = tid; i < kRows * N; i += kFwdThreads) {
      const int row = i / N, n = i % N, t = row / R, r = row % R;
      float qv = 0.f, kv = 0.f;
      if (row < mr) {
        const int l = begin + c0 + t;
        auto qx = [&](int j) {
          return dload(p.q, qk_off(p.q, b, l, r, g, j)) + dload(p.q_bias, bias_off(p.q_bias, h, r, j));
        };
        auto kx = [&](int j) {
          return dload(p.k, qk_off(p.k, b, l, r, g, j)) + dload(p.k_bias, bias_off(p.k_bias, h, r, j));
        };
        qv = rope_element(p.interleaved, N, NA, n, cosv + t * NA, sinv + t * NA, qx);
        kv = rope_element(p.interleaved, N, NA, n, cosv + t * NA, sinv + t * NA, kx);
      }
      Qh[row * lay.qn + n] = qv;
      Kh[row * lay.qn + n] = kv;
    }
    for (int i = tid; i < kRows * P; i += kFwdThreads) {
      const int row = i / P, x = i % P, t = row / R, r = row % R;
      float vv = 0.f;
      if (row < mr)
        vv = dload(p.v, b * p.v.stride[0] + (begin + c0 + t) * p.v.stride[1] + h * p.v.stride[2] +
                            x * p.v.stride[3]) *
             psi_at(r, x);
      Vr[row * lay.vp + x] = vv;
    }
    __syncthreads();

    // A = (Q K^T) o M over the chunk's rows.
    for (int i = tid; i < mr * mr; i += kFwdThreads) {
      const int row = i / mr, col = i % mr, ti = row / R, tj = col / R;
      float coef = 0.f;
      if (tj < ti)
        coef = expf(cs[ti] - cs[tj]) * w[tj];
      else if (tj == ti)
        coef = gam[ti];
      float acc = 0.f;
      if (coef != 0.f)
        for (int n = 0; n < N; ++n) acc += Qh[row * lay.qn + n] * Kh[col * lay.qn + n];
      A[row * lay.ap + col] = acc * coef;
    }
    __syncthreads();

    // Y = A V + diag(exp(cs)) Q S^T + D V.
    for (int i = tid; i < mr * P; i += kFwdThreads) {
      const int row = i / P, x = i % P;
      float acc = 0.f, inter = 0.f;
      const int jend = (row / R + 1) * R;  // same-token columns of other ranks count too
      for (int j = 0; j < jend; ++j) acc += A[row * lay.ap + j] * Vr[j * lay.vp + x];
      for (int n = 0; n < N; ++n) inter += Qh[row * lay.qn + n] * S[x * lay.qn + n];
      Y[row * lay.vp + x] = acc + ex[row / R] * inter + dskip * Vr[row * lay.vp + x];
    }
    __syncthreads();

    // S = exp(cs_last) S + sum_j fw_j v_j k_j^T.
    const float el = ex[m - 1];
    for (int i = tid; i < P * N; i += kFwdThreads) {
      const int x = i / N, n = i % N;
      float acc = el * S[x * lay.qn + n];
      for (int row = 0; row < mr; ++row)
        acc += fw[row / R] * Vr[row * lay.vp + x] * Kh[row * lay.qn + n];
      S[x * lay.qn + n] = acc;
    }
    // Output stage: per-row RMSNorm, gate, rank reduction.
    if (p.norm_weight.defined()) {
      rows_rstd(Y, lay.vp, mr, P, p.eps, rstd, warp, lane, kWarps);
      __syncthreads();
    }
    for (int i = tid; i < m * P; i += kFwdThreads) {
      const int t = i / P, x = i % P;
      store_output(p, b, begin + c0 + t, h, x, &Y[t * R * lay.vp + x], lay.vp, &rstd[t * R], 1,
                   zeta_s, phi_s, wn_s);
    }
    __syncthreads();
  }

  // Final states: S, wrapped angle, rotated k and raw v of the last token.
  write_final_states(
      p, s, h, g, b, end, n_tok, theta, [&](int x, int n) { return S[x * lay.qn + n]; }, tid,
      kFwdThreads);
}

}  // namespace mamba3::cuda
