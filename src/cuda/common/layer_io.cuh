// Pieces every kernel of the lane shares around its own arithmetic: per-head parameters cached
// in shared memory, the initial state (with the folded first beta term), the output stage of one
// (token, column) and the final states of a (sequence, head).
#pragma once

#include "cuda/common/params.cuh"

namespace mamba3::cuda {

// Element (r, x) of head h of an (H, R, P) parameter; 1 where the parameter is absent.
__device__ __forceinline__ float head_param(const DTensor& t, int h, int r, int x) {
  return t.defined() ? dload_ro(t, h * t.stride[0] + r * t.stride[1] + x * t.stride[2]) : 1.f;
}

// psi, zeta, phi (R, P) and the norm weight (P) of head h into shared memory; absent ones are 1.
__device__ __forceinline__ void load_head_params(const CoreParams& p, int h, float* psi,
                                                 float* zeta, float* phi, float* wn, int tid,
                                                 int nthreads) {
  for (int i = tid; i < p.R * p.P; i += nthreads) {
    const int r = i / p.P, x = i % p.P;
    psi[i] = head_param(p.mimo_v, h, r, x);
    zeta[i] = head_param(p.mimo_z, h, r, x);
    phi[i] = head_param(p.mimo_o, h, r, x);
  }
  for (int x = tid; x < p.P; x += nthreads)
    wn[x] = p.norm_weight.defined()
                ? dload_ro(p.norm_weight, h * p.norm_weight.stride[0] + x * p.norm_weight.stride[1])
                : 1.f;
}

// psi (R, P) of head h alone, for kernels without the output stage.
__device__ __forceinline__ void load_head_psi(const CoreParams& p, int h, float* psi, int tid,
                                              int nthreads) {
  for (int i = tid; i < p.R * p.P; i += nthreads) psi[i] = head_param(p.mimo_v, h, i / p.P, i % p.P);
}

// RMSNorm factors of a row-major fp32 tile, one warp per row: rstd[row] = 1 / sqrt(mean over
// the P columns of Y[row]^2 + eps) for rows < rows. The caller synchronizes before reading.
__device__ __forceinline__ void rows_rstd(const float* Y, int pitch, int rows, int P, float eps,
                                          float* rstd, int warp, int lane, int nwarps) {
  for (int row = warp; row < rows; row += nwarps) {
    float ss = 0.f;
    for (int x = lane; x < P; x += 32) ss += Y[row * pitch + x] * Y[row * pitch + x];
    ss = warp_sum(ss);
    if (lane == 0) rstd[row] = rsqrtf(ss / P + eps);
  }
}

// Element (x, n) of the state before the first chunk: S0 + sg0 sum_r (v0 psi_r) k0_r^T, where
// sg0 = (1 - lambda_0) dt_0 of a non-empty sequence (0 for an empty one or without states).
__device__ __forceinline__ float initial_state_elem(const CoreParams& p, int s, int h, int x, int n,
                                                    float sg0, const float* psi) {
  if (!p.init_ssm.defined()) return 0.f;
  float v0 = dload(p.init_ssm, s * p.init_ssm.stride[0] + h * p.init_ssm.stride[1] +
                                   x * p.init_ssm.stride[2] + n * p.init_ssm.stride[3]);
  if (sg0 != 0.f) {
    const float vx =
        dload(p.init_v, s * p.init_v.stride[0] + h * p.init_v.stride[1] + x * p.init_v.stride[2]);
    for (int r = 0; r < p.R; ++r)
      v0 += sg0 * vx * psi[r * p.P + x] * dload(p.init_k, sk_off(p.init_k, s, r, h, n));
  }
  return v0;
}

// Output (token l of batch row b, column x) from the token's R values y[r * y_stride] (y already
// includes D v): optional RMSNorm (rstd[r * rstd_stride]), gate silu(z zeta_r), then either
// the phi-weighted rank sum or one output per rank. `l_out` is the token's index in `out`.
// As store_output, with the gate input z of (token, column) already loaded (ignored without z).
__device__ __forceinline__ void store_output_z(const CoreParams& p, int b, int l, int h, int x,
                                               float z, const float* y, int y_stride,
                                               const float* rstd, int rstd_stride,
                                               const float* zeta, const float* phi,
                                               const float* wn) {
  float acc = 0.f;
  for (int r = 0; r < p.R; ++r) {
    float yn = y[r * y_stride];
    if (p.norm_weight.defined()) yn *= rstd[r * rstd_stride] * wn[x];
    float gate = 1.f;
    if (p.z.defined()) {
      const float u = z * zeta[r * p.P + x];
      gate = u * sigmoidf_(u);
    }
    if (p.per_rank_out)
      dstore(p.out, b * p.out.stride[0] + l * p.out.stride[1] + r * p.out.stride[2] +
                        h * p.out.stride[3] + x * p.out.stride[4],
             yn * gate);
    else
      acc += phi[r * p.P + x] * yn * gate;
  }
  if (!p.per_rank_out)
    dstore(p.out, b * p.out.stride[0] + l * p.out.stride[1] + h * p.out.stride[2] +
                      x * p.out.stride[3],
           acc);
}

__device__ __forceinline__ void store_output(const CoreParams& p, int b, int l, int h, int x,
                                             const float* y, int y_stride, const float* rstd,
                                             int rstd_stride, const float* zeta, const float* phi,
                                             const float* wn) {
  const float z = p.z.defined() ? dload_ro(p.z, b * p.z.stride[0] + l * p.z.stride[1] +
                                                    h * p.z.stride[2] + x * p.z.stride[3])
                                : 0.f;
  store_output_z(p, b, l, h, x, z, y, y_stride, rstd, rstd_stride, zeta, phi, wn);
}

// Final states of sequence s, head h, tokens [end - n_tok, end) of batch row b: the ssm state
// (s_at(x, n), or the initial one for an empty sequence), the wrapped angle theta[i], the last
// token's rotated k (recomputed in fp32 from the inputs) and its raw v.
// `write_ssm` false: the caller writes the ssm state itself (kept in registers).
template <typename SAt>
__device__ void write_final_states(const CoreParams& p, int s, int h, int g, int b, int end,
                                   int n_tok, const double* theta, SAt s_at, int tid,
                                   int nthreads, bool write_ssm = true) {
  if (!p.fin_ssm.defined()) return;
  const int N = p.N, P = p.P, NA = p.NA;
  const bool has_init = p.init_ssm.defined();
  for (int i = tid; write_ssm && i < P * N; i += nthreads) {
    const int x = i / N, n = i % N;
    float val = 0.f;
    if (n_tok > 0)
      val = s_at(x, n);
    else if (has_init)
      val = dload(p.init_ssm, s * p.init_ssm.stride[0] + h * p.init_ssm.stride[1] +
                                  x * p.init_ssm.stride[2] + n * p.init_ssm.stride[3]);
    dstore(p.fin_ssm, s * p.fin_ssm.stride[0] + h * p.fin_ssm.stride[1] + x * p.fin_ssm.stride[2] +
                          n * p.fin_ssm.stride[3],
           val);
  }
  for (int i = tid; i < NA; i += nthreads)
    dstore_f64(p.fin_angle, s * p.fin_angle.stride[0] + h * p.fin_angle.stride[1] +
                                i * p.fin_angle.stride[2],
               wrap_2pi(theta[i]));
  for (int i = tid; i < p.R * N; i += nthreads) {
    const int r = i / N, n = i % N;
    float val = 0.f;
    if (n_tok > 0) {
      auto kx = [&](int j) {
        return dload(p.k, qk_off(p.k, b, end - 1, r, g, j)) +
               dload(p.k_bias, bias_off(p.k_bias, h, r, j));
      };
      // Rope pair of element n: index i0 (or none), first or second member, partner.
      int i0 = -1, first = 0, partner = 0;
      if (p.interleaved) {
        if ((n >> 1) < NA) i0 = n >> 1, first = (n & 1) == 0, partner = n ^ 1;
      } else {
        const int half = N / 2;
        if (n < NA)
          i0 = n, first = 1, partner = n + half;
        else if (n >= half && n - half < NA)
          i0 = n - half, first = 0, partner = n - half;
      }
      if (i0 < 0) {
        val = kx(n);
      } else {
        float sn, cn;
        __sincosf(static_cast<float>(wrap_2pi(theta[i0])), &sn, &cn);
        const float self = kx(n), other = kx(partner);
        val = first ? self * cn - other * sn : other * sn + self * cn;
      }
    } else if (has_init) {
      val = dload(p.init_k, sk_off(p.init_k, s, r, h, n));
    }
    dstore(p.fin_k, sk_off(p.fin_k, s, r, h, n), val);
  }
  for (int x = tid; x < P; x += nthreads) {
    float val = 0.f;
    if (n_tok > 0)
      val = dload(p.v, b * p.v.stride[0] + (end - 1) * p.v.stride[1] + h * p.v.stride[2] +
                           x * p.v.stride[3]);
    else if (has_init)
      val = dload(p.init_v, s * p.init_v.stride[0] + h * p.init_v.stride[1] + x * p.init_v.stride[2]);
    dstore(p.fin_v, s * p.fin_v.stride[0] + h * p.fin_v.stride[1] + x * p.fin_v.stride[2], val);
  }
}

}  // namespace mamba3::cuda
