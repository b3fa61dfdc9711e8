// Host side of the decode step: which kernel takes a call (persistent, fast, general), grid and
// threads, the shared-memory attribute and the launch. Compiled by nvcc in dispatch.cu, and as
// plain C++ by the CPU emulation test (MAMBA3_CUDA_EMU, tests/emu/test_step_emu.cpp), which runs
// the same kernels with one host thread per CUDA thread. The gates and tunables are described in
// step_persist_launch.cuh.
#pragma once

#include "cuda/step/step_fast_kernel.cuh"
#include "cuda/step/step_persist_launch.cuh"

namespace mamba3::cuda::decode {

template <int R, int N, int T>
Status launch_fast_rnt(const CoreParams& p, const Dims& d, cudaStream_t stream) {
  auto kernel = step_fast_kernel<R, N, T>;
  const size_t bytes = step_fast_smem_bytes(N, p.P, R, p.NA);
  M3_RETURN_IF_ERROR(allow_smem(kernel, bytes));
  M3S_LAUNCH(kernel, static_cast<unsigned>(d.B * d.H), T, bytes, stream, p);
  M3S_CHECK_LAUNCH("step_fast_kernel");
  return Status::Ok();
}

template <int R>
Status launch_fast_r(const CoreParams& p, const Dims& d, int threads, cudaStream_t stream) {
  if (threads == 128)
    return p.N == 64 ? launch_fast_rnt<R, 64, 128>(p, d, stream)
                     : launch_fast_rnt<R, 128, 128>(p, d, stream);
  return p.N == 64 ? launch_fast_rnt<R, 64, 256>(p, d, stream)
                   : launch_fast_rnt<R, 128, 256>(p, d, stream);
}

// Which kernel a step takes (for tests): 2 persistent, 1 fast, 0 general; or an error from the
// gates.
inline Status step_kernel_choice(const StepArgs& a, const Dims& d, const CoreParams& p, int* which,
                                 StepPersistParams* sp) {
  bool on = true, forced = false;
  M3_RETURN_IF_ERROR(persistent_gate(&on, &forced));
  const bool ok = step_persist_params(a, d, p, sp);
  if (forced && !ok)
    return Status::NotSupported(
        "MAMBA3_CUDA_STEP_PERSISTENT=1: the persistent decode kernel needs fp32 float4 state "
        "rows, N in {64, 128}, P % 16 == 0 and P <= 128, R in {1, 2, 4, 8}, one dtype (bf16, "
        "fp16 or fp32) for q, k, v, z and trap, fp32 parameters and states, 32-bit offsets");
  *which = on && ok ? 2 : step_fast_ok(p) ? 1 : 0;
  return Status::Ok();
}

// A validated step `a` (dims `d`, device views `p` of its one-token forward view).
inline Status launch_step(const StepArgs& a, const Dims& d, const CoreParams& p,
                          cudaStream_t stream) {
  int which = 0;
  StepPersistParams sp{};
  M3_RETURN_IF_ERROR(step_kernel_choice(a, d, p, &which, &sp));
  if (which > 0) {
    int threads = 0;
    M3_RETURN_IF_ERROR(step_threads(p, d, which == 2, &threads));
    if (which == 2) {
      switch (a.q.dtype) {
        case DType::kBF16: return launch_persist<__nv_bfloat16>(sp, p.R, p.N, threads, stream);
        case DType::kF16: return launch_persist<__half>(sp, p.R, p.N, threads, stream);
        default: return launch_persist<float>(sp, p.R, p.N, threads, stream);
      }
    }
    switch (p.R) {
      case 1: return launch_fast_r<1>(p, d, threads, stream);
      case 2: return launch_fast_r<2>(p, d, threads, stream);
      case 4: return launch_fast_r<4>(p, d, threads, stream);
      default: return launch_fast_r<8>(p, d, threads, stream);
    }
  }
  const size_t bytes = step_smem_bytes(p.N, p.P, p.R, p.NA, p.state_vec4);
  M3_RETURN_IF_ERROR(allow_smem(step_kernel, bytes));
  M3S_LAUNCH(step_kernel, static_cast<unsigned>(d.B * d.H), kStepThreads, bytes, stream, p);
  M3S_CHECK_LAUNCH("step_kernel");
  return Status::Ok();
}

}  // namespace mamba3::cuda::decode
