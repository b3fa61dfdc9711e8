// Host side of the persistent decode step (step_persist_kernel.cuh): its arguments, the gates
// and tunables of the decode step, grid and launch. Included by step_launch.cuh (the choice
// between the step kernels) and by step_persist_{bf16,f16,f32}.cu (the instantiations); compiled
// as plain C++ by the CPU emulation test (MAMBA3_CUDA_EMU, tests/emu/test_step_emu.cpp).
//
// MAMBA3_CUDA_STEP_PERSISTENT: unset or "1" takes the persistent kernel where it applies
// (step_persist_ok), "0" the previous fast kernel; "1" where it does not apply is an error.
// MAMBA3_CUDA_STEP_CTAS (a positive integer): the persistent kernel's grid, to test the
// grid-stride loop on small shapes or to tune; unset: CTAs per SM x SMs. Anything else is an
// error. MAMBA3_CUDA_STEP_THREADS (128 or 256) as before.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string>

#include "core/return_if_error.h"
#include "core/validate.h"
#include "cuda/common/launch.cuh"
#include "cuda/step/step_persist_kernel.cuh"

#ifndef MAMBA3_CUDA_EMU
#include "cuda/common/check.cuh"
#define M3S_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define M3S_CHECK(expr) MAMBA3_CHECK_CUDA(expr)
#define M3S_CHECK_LAUNCH(name) MAMBA3_CHECK_LAUNCH(name)
#else
#define M3S_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::m3emu::launch(kernel, dim3(grid), dim3(block), smem, __VA_ARGS__)
#define M3S_CHECK(expr) (void)0
#define M3S_CHECK_LAUNCH(name) (void)0
#endif

namespace mamba3::cuda::decode {

// Whether every element offset of `t` (its shape and strides) fits in 32 bits.
inline bool offsets_fit_int32(const Tensor& t) {
  if (!t.defined()) return true;
  int64_t max_off = 0;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.strides[i] < 0 || t.strides[i] > INT_MAX) return false;
    if (t.shape[i] > 0) max_off += (t.shape[i] - 1) * t.strides[i];
  }
  return max_off <= INT_MAX;
}

inline int s32(int64_t v) { return static_cast<int>(v); }

// The persistent kernel's arguments for step `a` (validated, dims `d`, device views `p`), or
// false where it does not apply: q, k, v, trap (and z) of different dtypes or float64, a
// parameter or state not fp32, an offset beyond 32 bits, or a shape the fast kernel does not
// take (step_persist_shape_ok).
inline bool step_persist_params(const StepArgs& a, const Dims& d, const CoreParams& p,
                                StepPersistParams* sp) {
  if (!step_persist_shape_ok(p)) return false;
  const DType t = a.q.dtype;
  if (t != DType::kBF16 && t != DType::kF16 && t != DType::kF32) return false;
  for (const Tensor* x : {&a.k, &a.v, &a.trap, &a.z})
    if (x->defined() && x->dtype != t) return false;
  for (const Tensor* x : {&a.adt, &a.dt, &a.angles, &a.q_bias, &a.k_bias, &a.d, &a.mimo_v,
                          &a.mimo_z, &a.mimo_o, &a.norm_weight, &a.state.angle, &a.state.ssm,
                          &a.state.k, &a.state.v})
    if (x->defined() && x->dtype != DType::kF32) return false;
  for (const Tensor* x : {&a.q, &a.k, &a.v, &a.trap, &a.z, &a.adt, &a.dt, &a.angles, &a.q_bias,
                          &a.k_bias, &a.d, &a.mimo_v, &a.mimo_z, &a.mimo_o, &a.norm_weight,
                          &a.state.angle, &a.state.ssm, &a.state.k, &a.state.v, &a.out})
    if (!offsets_fit_int32(*x)) return false;
  if (d.B * d.H > INT_MAX) return false;

  StepPersistParams s{};
  s.q = a.q.data, s.k = a.k.data, s.v = a.v.data, s.trap = a.trap.data;
  s.z = a.z.defined() ? a.z.data : nullptr;
  auto f32 = [](const Tensor& x) {
    return x.defined() ? static_cast<const float*>(x.data) : nullptr;
  };
  s.adt = f32(a.adt), s.dt = f32(a.dt), s.angles = f32(a.angles);
  s.q_bias = f32(a.q_bias), s.k_bias = f32(a.k_bias), s.d = f32(a.d);
  s.mimo_v = f32(a.mimo_v), s.mimo_z = f32(a.mimo_z), s.mimo_o = f32(a.mimo_o);
  s.norm_weight = f32(a.norm_weight);
  s.angle = static_cast<float*>(a.state.angle.data);
  s.ssm = static_cast<float*>(a.state.ssm.data);
  s.kst = static_cast<float*>(a.state.k.data);
  s.vst = static_cast<float*>(a.state.v.data);
  s.out = a.out.data;
  s.out_dtype = a.out.dtype;
  // q, k: (B, R, G, N) or (B, G, N).
  const Tensor &q = a.q, &k = a.k;
  const bool q4 = q.ndim == 4;
  s.q_b = s32(q.strides[0]), s.q_r = q4 ? s32(q.strides[1]) : 0;
  s.q_g = s32(q.strides[q.ndim - 2]), s.q_n = s32(q.strides[q.ndim - 1]);
  s.k_b = s32(k.strides[0]), s.k_r = q4 ? s32(k.strides[1]) : 0;
  s.k_g = s32(k.strides[k.ndim - 2]), s.k_n = s32(k.strides[k.ndim - 1]);
  s.v_b = s32(a.v.strides[0]), s.v_h = s32(a.v.strides[1]), s.v_x = s32(a.v.strides[2]);
  if (a.z.defined())
    s.z_b = s32(a.z.strides[0]), s.z_h = s32(a.z.strides[1]), s.z_x = s32(a.z.strides[2]);
  s.trap_b = s32(a.trap.strides[0]), s.trap_h = s32(a.trap.strides[1]);
  s.adt_b = s32(a.adt.strides[0]), s.adt_h = s32(a.adt.strides[1]);
  s.dt_b = s32(a.dt.strides[0]), s.dt_h = s32(a.dt.strides[1]);
  s.ang_b = s32(a.angles.strides[0]), s.ang_h = s32(a.angles.strides[1]);
  s.ang_i = s32(a.angles.strides[2]);
  // biases (H, R, N) or (H, N).
  auto bias = [](const Tensor& x, int* h, int* r, int* n) {
    *h = s32(x.strides[0]);
    *r = x.ndim == 3 ? s32(x.strides[1]) : 0;
    *n = s32(x.strides[x.ndim - 1]);
  };
  bias(a.q_bias, &s.qb_h, &s.qb_r, &s.qb_n);
  bias(a.k_bias, &s.kb_h, &s.kb_r, &s.kb_n);
  if (a.d.defined()) s.d_h = s32(a.d.strides[0]);
  auto hrp = [](const Tensor& x, int* h, int* r, int* xs) {
    if (x.defined()) *h = s32(x.strides[0]), *r = s32(x.strides[1]), *xs = s32(x.strides[2]);
  };
  hrp(a.mimo_v, &s.mv_h, &s.mv_r, &s.mv_x);
  hrp(a.mimo_z, &s.mz_h, &s.mz_r, &s.mz_x);
  hrp(a.mimo_o, &s.mo_h, &s.mo_r, &s.mo_x);
  if (a.norm_weight.defined())
    s.nw_h = s32(a.norm_weight.strides[0]), s.nw_x = s32(a.norm_weight.strides[1]);
  const States& st = a.state;
  s.sa_b = s32(st.angle.strides[0]), s.sa_h = s32(st.angle.strides[1]);
  s.sa_i = s32(st.angle.strides[2]);
  s.ss_b = s32(st.ssm.strides[0]), s.ss_h = s32(st.ssm.strides[1]);
  s.ss_x = s32(st.ssm.strides[2]);
  // state k (S, R, H, N) or (S, H, N).
  const bool k4 = st.k.ndim == 4;
  s.sk_b = s32(st.k.strides[0]), s.sk_r = k4 ? s32(st.k.strides[1]) : 0;
  s.sk_h = s32(st.k.strides[st.k.ndim - 2]), s.sk_n = s32(st.k.strides[st.k.ndim - 1]);
  s.sv_b = s32(st.v.strides[0]), s.sv_h = s32(st.v.strides[1]), s.sv_x = s32(st.v.strides[2]);
  // out (B, H, P) or per rank (B, R, H, P).
  const Tensor& o = a.out;
  s.o_b = s32(o.strides[0]), s.o_r = o.ndim == 4 ? s32(o.strides[1]) : 0;
  s.o_h = s32(o.strides[o.ndim - 2]), s.o_x = s32(o.strides[o.ndim - 1]);
  s.items = s32(d.B * d.H), s.H = s32(d.H), s.hpg = s32(d.heads_per_group());
  s.P = s32(d.P), s.NA = s32(d.NA);
  s.interleaved = a.rope_pairing == RopePairing::kInterleaved;
  s.per_rank_out = d.per_rank_out;
  s.eps = a.norm_eps;
  *sp = s;
  return true;
}

// MAMBA3_CUDA_STEP_PERSISTENT: 1 (default when unset) or 0.
inline Status persistent_gate(bool* on, bool* forced) {
  *on = true, *forced = false;
  const char* env = std::getenv("MAMBA3_CUDA_STEP_PERSISTENT");
  if (env == nullptr || *env == '\0') return Status::Ok();
  if (std::string(env) == "0" || std::string(env) == "1") {
    *on = *forced = env[0] == '1';
    return Status::Ok();
  }
  return Status::InvalidArgument(
      std::string("MAMBA3_CUDA_STEP_PERSISTENT: expected 0 or 1, got '") + env + "'");
}

// Threads per CTA. Fast kernel, measured on the H200 (2026-11-29 09:51Z, bf16, H = 64,
// N = 128, P = 64): 128 threads (5 CTAs per SM) beat 256 (4 per SM) for R = 1 on large grids
// (batch 128: 215 vs 229 us, batch 512: 835 vs 902 us), 256 wins at batch 1 (8.1 vs 9.4 us) and
// for R = 4 at every batch (370 vs 473 us at batch 128). So: 128 for R = 1 when there are at
// least 32 CTAs per SM (between the measured 0.5 and 62), else 256. Persistent kernel: 256
// (shared memory allows 2-3 CTAs per SM whatever the CTA size, so the larger CTA has twice the
// warps to hide latency with; not yet measured against 128).
// MAMBA3_CUDA_STEP_THREADS (128 or 256) overrides it, to test or tune; anything else is an
// error, not "unset".
inline Status step_threads(const CoreParams& p, const Dims& d, bool persistent, int* threads) {
  *threads = !persistent && p.R == 1 && d.B * d.H >= 32 * static_cast<int64_t>(sm_count())
                 ? 128
                 : 256;
  const char* env = std::getenv("MAMBA3_CUDA_STEP_THREADS");
  if (env == nullptr || *env == '\0') return Status::Ok();
  if (std::string(env) == "128" || std::string(env) == "256") {
    *threads = std::atoi(env);
    return Status::Ok();
  }
  return Status::InvalidArgument(std::string("MAMBA3_CUDA_STEP_THREADS: expected 128 or 256, got '") +
                                 env + "'");
}

// Persistent kernel: grid = min(items, CTAs per SM x SMs), or MAMBA3_CUDA_STEP_CTAS.
template <typename T, int R, int N, int kThreads>
Status launch_persist_rnt(const StepPersistParams& sp, cudaStream_t stream) {
  auto kernel = step_persist_kernel<T, R, N, kThreads>;
  const size_t bytes = step_persist_smem_bytes(N, sp.P, R);
  M3_RETURN_IF_ERROR(allow_smem_max_carveout(kernel, bytes));
  int ctas = 0;
  M3_RETURN_IF_ERROR(env_positive("MAMBA3_CUDA_STEP_CTAS", &ctas));
  if (ctas == 0) {
    int per_sm = 1;
#ifdef MAMBA3_CUDA_EMU
    per_sm = std::max<int>(1, static_cast<int>(227 * 1024 / (bytes + 1024)));
#else
    M3S_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, bytes));
    per_sm = std::max(per_sm, 1);
#endif
    ctas = per_sm * sm_count();
  }
  const unsigned grid = static_cast<unsigned>(std::min(ctas, sp.items));
  M3S_LAUNCH(kernel, grid, kThreads, bytes, stream, sp);
  M3S_CHECK_LAUNCH("step_persist_kernel");
  return Status::Ok();
}

template <typename T, int R>
Status launch_persist_r(const StepPersistParams& sp, int n, int threads, cudaStream_t stream) {
  if (threads == 128)
    return n == 64 ? launch_persist_rnt<T, R, 64, 128>(sp, stream)
                   : launch_persist_rnt<T, R, 128, 128>(sp, stream);
  return n == 64 ? launch_persist_rnt<T, R, 64, 256>(sp, stream)
                 : launch_persist_rnt<T, R, 128, 256>(sp, stream);
}

// One instantiation per (dtype, R, N, threads); the dtypes are explicitly instantiated in
// step_dispatch_{bf16,f16,f32}.cu so they compile in parallel.
template <typename T>
Status launch_persist(const StepPersistParams& sp, int R, int N, int threads,
                      cudaStream_t stream) {
  switch (R) {
    case 1: return launch_persist_r<T, 1>(sp, N, threads, stream);
    case 2: return launch_persist_r<T, 2>(sp, N, threads, stream);
    case 4: return launch_persist_r<T, 4>(sp, N, threads, stream);
    default: return launch_persist_r<T, 8>(sp, N, threads, stream);
  }
}

#ifndef MAMBA3_CUDA_EMU
extern template Status launch_persist<__nv_bfloat16>(const StepPersistParams&, int, int, int,
                                                     cudaStream_t);
extern template Status launch_persist<__half>(const StepPersistParams&, int, int, int,
                                              cudaStream_t);
extern template Status launch_persist<float>(const StepPersistParams&, int, int, int,
                                             cudaStream_t);
#endif

}  // namespace mamba3::cuda::decode
