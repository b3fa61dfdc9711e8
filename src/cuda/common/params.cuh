// Everything a CUDA kernel of this lane needs, as device views, built once per call on the
// host from validated arguments (a decode step is built from its one-token forward view).
#pragma once

#include "core/validate.h"
#include "cuda/common/device_tensor.cuh"

namespace mamba3::cuda {

struct CoreParams {
  DTensor q, k, v, adt, dt, trap, q_bias, k_bias, angles, d, z, mimo_v, mimo_z, mimo_o,
      norm_weight;
  DTensor init_angle, init_ssm, init_k, init_v;   // absent: zero initial states
  DTensor fin_angle, fin_ssm, fin_k, fin_v;       // absent: final states not requested
  DTensor out;
  const int32_t* cu_seqlens = nullptr;  // (S + 1,) or null
  int64_t cu_stride = 1;
  int B = 0, L = 0, H = 0, G = 0, N = 0, P = 0, R = 1, NA = 0, S = 0, hpg = 1;
  bool per_rank_out = false, interleaved = true;
  // Decode: the ssm state is fp32, rows contiguous and 16-byte aligned, N/4 divides 32, so
  // the step kernel streams it with float4 accesses.
  bool state_vec4 = false;
  // Forward: q, k, v are bf16 with contiguous, 16-byte aligned rows (16-byte tile loads) and
  // strides below 2^24 past the batch dimension (32-bit offsets inside a chunk).
  bool tc_vec = false;
  // Tensor-core forward: z bf16 with 16-byte aligned contiguous rows (cp.async tiles) and
  // angles fp32 with 16-byte aligned contiguous rows of NA (NA % 4 == 0), strides as tc_vec's;
  // out bf16 with contiguous, 4-byte aligned column pairs.
  bool z_vec = false, ang_vec4 = false, out_vec2 = false;
  float eps = 1e-5f;
};

inline CoreParams make_params(const ForwardArgs& a, const Dims& d) {
  CoreParams p;
  const Inputs& in = a.in;
  p.q = to_device_view(in.q), p.k = to_device_view(in.k), p.v = to_device_view(in.v);
  p.adt = to_device_view(in.adt), p.dt = to_device_view(in.dt), p.trap = to_device_view(in.trap);
  p.q_bias = to_device_view(in.q_bias), p.k_bias = to_device_view(in.k_bias);
  p.angles = to_device_view(in.angles), p.d = to_device_view(in.d), p.z = to_device_view(in.z);
  p.mimo_v = to_device_view(in.mimo_v), p.mimo_z = to_device_view(in.mimo_z);
  p.mimo_o = to_device_view(in.mimo_o), p.norm_weight = to_device_view(in.norm_weight);
  if (in.initial.all()) {
    p.init_angle = to_device_view(in.initial.angle), p.init_ssm = to_device_view(in.initial.ssm);
    p.init_k = to_device_view(in.initial.k), p.init_v = to_device_view(in.initial.v);
  }
  if (a.final_states.all()) {
    p.fin_angle = to_device_view(a.final_states.angle);
    p.fin_ssm = to_device_view(a.final_states.ssm);
    p.fin_k = to_device_view(a.final_states.k), p.fin_v = to_device_view(a.final_states.v);
  }
  p.out = to_device_view(a.out);
  if (in.cu_seqlens.defined()) {
    p.cu_seqlens = static_cast<const int32_t*>(in.cu_seqlens.data);
    p.cu_stride = in.cu_seqlens.strides[0];
  }
  p.B = static_cast<int>(d.B), p.L = static_cast<int>(d.L), p.H = static_cast<int>(d.H);
  p.G = static_cast<int>(d.G), p.N = static_cast<int>(d.N), p.P = static_cast<int>(d.P);
  p.R = static_cast<int>(d.R), p.NA = static_cast<int>(d.NA), p.S = static_cast<int>(d.S);
  p.hpg = static_cast<int>(d.heads_per_group());
  p.per_rank_out = d.per_rank_out;
  p.interleaved = in.rope_pairing == RopePairing::kInterleaved;
  p.eps = in.norm_eps;
  auto vec4_ok = [](const Tensor& t) {
    return t.defined() && t.dtype == DType::kF32 && t.strides[3] == 1 && t.strides[2] % 4 == 0 &&
           t.strides[1] % 4 == 0 && t.strides[0] % 4 == 0 &&
           reinterpret_cast<uintptr_t>(t.data) % 16 == 0;
  };
  // The tensor-core forward addresses a chunk's tile rows as one 64-bit chunk base plus a
  // 32-bit offset per thread (at most 64 tokens and 8 ranks from the base): strides other than
  // the batch stride must stay below 2^24 elements (any layout of a realistic size does).
  auto chunk32 = [](const Tensor& t) {
    for (int i = 1; i < t.ndim; ++i)
      if (t.strides[i] >= (int64_t{1} << 24)) return false;
    return true;
  };
  auto rows16 = [&](const Tensor& t) {
    if (!t.defined() || t.dtype != DType::kBF16 || t.strides[t.ndim - 1] != 1) return false;
    for (int i = 0; i + 1 < t.ndim; ++i)
      if (t.strides[i] % 8 != 0) return false;
    return chunk32(t) && reinterpret_cast<uintptr_t>(t.data) % 16 == 0;
  };
  p.tc_vec = rows16(in.q) && rows16(in.k) && rows16(in.v) && d.N % 16 == 0 && d.P % 8 == 0;
  p.z_vec = rows16(in.z) && d.P % 8 == 0;
  {
    const Tensor& A = in.angles;
    p.ang_vec4 = A.defined() && A.dtype == DType::kF32 && d.NA % 4 == 0 && A.strides[3] == 1 &&
                 A.strides[0] % 4 == 0 && A.strides[1] % 4 == 0 && A.strides[2] % 4 == 0 &&
                 chunk32(A) && reinterpret_cast<uintptr_t>(A.data) % 16 == 0;
    const Tensor& O = a.out;
    bool even = O.defined() && O.dtype == DType::kBF16 && O.strides[O.ndim - 1] == 1 &&
                reinterpret_cast<uintptr_t>(O.data) % 4 == 0;
    for (int i = 0; even && i + 1 < O.ndim; ++i) even = O.strides[i] % 2 == 0;
    p.out_vec2 = even;
  }
  p.state_vec4 = d.N % 4 == 0 && d.N <= 128 && 32 % (d.N / 4) == 0 &&
                 vec4_ok(in.initial.ssm) && vec4_ok(a.final_states.ssm);
  return p;
}

// Rotated element n of x (an N-vector read through `x_at`) for rope angles (cos, sin)[i].
template <typename F>
__device__ __forceinline__ float rope_element(bool interleaved, int N, int NA, int n,
                                              const float* cosv, const float* sinv, F x_at) {
  if (interleaved) {
    const int i = n >> 1;
    if (i >= NA) return x_at(n);
    const float a = x_at(2 * i), b = x_at(2 * i + 1);
    return (n & 1) ? a * sinv[i] + b * cosv[i] : a * cosv[i] - b * sinv[i];
  }
  const int half = N / 2;
  if (n < NA) return x_at(n) * cosv[n] - x_at(n + half) * sinv[n];
  if (n >= half && n - half < NA) {
    const int i = n - half;
    return x_at(i) * sinv[i] + x_at(n) * cosv[i];
  }
  return x_at(n);
}

// As rope_element, with the pair's angle theta[i] instead of a cos/sin table.
template <typename F>
__device__ __forceinline__ float rope_element_theta(bool interleaved, int N, int NA, int n,
                                                    const float* theta, F x_at) {
  int i, ia, ib;
  bool second;
  if (interleaved) {
    i = n >> 1;
    if (i >= NA) return x_at(n);
    ia = 2 * i, ib = 2 * i + 1, second = (n & 1) != 0;
  } else {
    const int half = N / 2;
    if (n < NA) {
      i = n, ia = n, ib = n + half, second = false;
    } else if (n >= half && n - half < NA) {
      i = n - half, ia = i, ib = n, second = true;
    } else {
      return x_at(n);
    }
  }
  float sn, cs;
  __sincosf(theta[i], &sn, &cs);
  const float a = x_at(ia), b = x_at(ib);
  return second ? a * sn + b * cs : a * cs - b * sn;
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

constexpr float kLog2e = 1.4426950408889634f;

// 2^x on the MUFU (ex2.approx.ftz: flush-to-zero, no range fix-up, ~2^-22 relative error),
// for exponents of decays (at most 0) and the gate below. silu(u) = u sigmoid(u) =
// u / (1 + 2^(-u log2 e)) with rcp.approx.ftz: 0 when exp(-u) overflows, as __expf /
// __fdividef gave. The CPU emulation (tests/emu) uses libm: close, not bit-exact.
#ifndef MAMBA3_CUDA_EMU
__device__ __forceinline__ float ex2_approx(float x) {
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x));
  return e;
}
// sigmoid(u) = 1 / (1 + 2^(-u log2 e)): 1 where 2^(-u log2 e) flushes to 0, 0 where it
// overflows.
__device__ __forceinline__ float sigmoid_approx(float u) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.f + ex2_approx(u * -kLog2e)));
  return r;
}
__device__ __forceinline__ float silu_approx(float u) { return u * sigmoid_approx(u); }
#else
inline float ex2_approx(float x) { return std::exp2(x); }
inline float silu_approx(float u) { return u / (1.f + std::exp(-u)); }
inline float sigmoid_approx(float u) { return 1.f / (1.f + std::exp2(u * -kLog2e)); }
#endif

// tanh(x) = sign(x) (1 - 2 / (1 + e^(2|x|))) with ex2.approx / rcp.approx (through
// __fdividef's reciprocal): absolute error about 2^-22 over the whole range (relative error large
// only where |x| < ~1e-6), one MUFU pair and no branch, where tanhf takes a polynomial branch for
// small |x|. For the angle increments, whose absolute error is what reaches theta. NaN stays NaN;
// +-inf gives +-1.
__device__ __forceinline__ float tanh_abs_err(float x) {
  const float e = ex2_approx(fabsf(x) * (2.f * kLog2e));
  return copysignf(1.f - __fdividef(2.f, 1.f + e), x);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr double kPiD = 3.14159265358979323846;

__device__ __forceinline__ double wrap_2pi(double x) {
  const double two_pi = 2.0 * kPiD, inv_two_pi = 1.0 / (2.0 * kPiD);
  double w = fma(-two_pi, floor(x * inv_two_pi), x);
  return (w >= two_pi || w < 0.0) ? 0.0 : w;
}

// wrap_2pi in float, for x of small magnitude (a wrapped angle plus a few increments of
// either sign).
__device__ __forceinline__ float wrap_2pi_f(float x) {
  constexpr float two_pi = static_cast<float>(2.0 * kPiD), inv_two_pi = static_cast<float>(0.5 / kPiD);
  const float w = fmaf(-two_pi, floorf(x * inv_two_pi), x);
  return (w >= two_pi || w < 0.f) ? 0.f : w;
}

}  // namespace mamba3::cuda
