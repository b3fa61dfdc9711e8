// Runtime dispatch of the CUDA lane: checks the configuration against what the kernels serve,
// sets up shared memory and launches; host-staged wrappers for tools and tests.
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "core/step_view.h"
#include "core/validate.h"
#include "cuda/chunk_bwd/bwd_dispatch.h"
#include "cuda/chunk_fwd/fwd_kernel.cuh"
#include "cuda/chunk_fwd_tc/fwd_tc_kernel.cuh"
#include "cuda/common/check.cuh"
#include "cuda/common/staging.cuh"
#include "cuda/cuda_lane.h"
#include "cuda/step/step_kernel.cuh"

namespace mamba3::cuda {
namespace {

// The SIMT kernels take N, P, R at run time; these bounds keep their shared memory in budget.
Status check_supported(const Dims& d) {
  const bool ok = d.N <= 128 && d.P <= 128 && (d.R == 1 || d.R == 2 || d.R == 4 || d.R == 8);
  if (!ok)
    return Status::NotSupported("cuda lane: N = " + std::to_string(d.N) + ", P = " +
                                std::to_string(d.P) + ", R = " + std::to_string(d.R) +
                                " not supported (needs N <= 128, P <= 128, R in {1, 2, 4, 8}); "
                                "the cpu lane runs it");
  return Status::Ok();
}

// Packed sequences live on the device; validation could not read them, so check them here.
Status check_cu_seqlens(const Inputs& in, const Dims& d) {
  if (!in.cu_seqlens.defined()) return Status::Ok();
  std::vector<int32_t> cu(d.S + 1);
  MAMBA3_CHECK_CUDA(cudaMemcpy2D(cu.data(), sizeof(int32_t), in.cu_seqlens.data,
                                 sizeof(int32_t) * in.cu_seqlens.strides[0], sizeof(int32_t),
                                 d.S + 1, cudaMemcpyDeviceToHost));
  if (cu[0] != 0) return Status::InvalidArgument("cu_seqlens: must start at 0");
  for (int64_t s = 0; s < d.S; ++s)
    if (cu[s + 1] < cu[s]) return Status::InvalidArgument("cu_seqlens: must be non-decreasing");
  if (cu[d.S] != d.L)
    return Status::InvalidArgument("cu_seqlens: must end at L = " + std::to_string(d.L));
  return Status::Ok();
}

// Tensor-core forward for bf16 activations at the compiled (N, P); everything else takes the
// fp32 SIMT kernel (fp32 inputs keep fp32 accuracy there; fp16 is not rounded to bf16).
template <int N, int P>
Status launch_forward_tc(const CoreParams& p, const Dims& d, cudaStream_t stream) {
  const size_t bytes = TcLayout<N, P>::kBytes;
  MAMBA3_CHECK_CUDA(cudaFuncSetAttribute(fwd_tc_kernel<N, P>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  fwd_tc_kernel<N, P><<<static_cast<unsigned>(d.S * d.H), kTcThreads, bytes, stream>>>(p);
  MAMBA3_CHECK_LAUNCH("fwd_tc_kernel");
  return Status::Ok();
}

bool use_tensor_cores(const ForwardArgs& a, const Dims& d) {
  const Inputs& in = a.in;
  return in.q.dtype == DType::kBF16 && in.k.dtype == DType::kBF16 && in.v.dtype == DType::kBF16 &&
         (d.N == 64 || d.N == 128) && (d.P == 64 || d.P == 128) && kTcRows % d.R == 0 &&
         d.NA <= 64;
}

Status launch_forward(const ForwardArgs& a, const Dims& d) {
  if (d.S * d.H == 0) return Status::Ok();
  const CoreParams p = make_params(a, d);
  const cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  if (use_tensor_cores(a, d)) {
    if (d.N == 64 && d.P == 64) return launch_forward_tc<64, 64>(p, d, stream);
    if (d.N == 64 && d.P == 128) return launch_forward_tc<64, 128>(p, d, stream);
    if (d.N == 128 && d.P == 64) return launch_forward_tc<128, 64>(p, d, stream);
    return launch_forward_tc<128, 128>(p, d, stream);
  }
  const FwdSmem lay = fwd_smem_layout(p.N, p.P, p.NA);
  const size_t bytes = sizeof(float) * lay.total_floats;
  MAMBA3_CHECK_CUDA(
      cudaFuncSetAttribute(fwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  fwd_kernel<<<static_cast<unsigned>(d.S * d.H), kFwdThreads, bytes,
               static_cast<cudaStream_t>(a.stream)>>>(p, lay);
  MAMBA3_CHECK_LAUNCH("fwd_kernel");
  return Status::Ok();
}

#define M3_RETURN_IF_ERROR(expr)  \
  do {                            \
    ::mamba3::Status _s = (expr); \
    if (!_s.ok()) return _s;      \
  } while (0)


}  // namespace

bool compiled() { return true; }

int device_count() {
  int count = 0;
  // No driver, no device or an incompatible driver all come back as errors here; clear the
  // sticky last-error state so later runtime calls are not affected.
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::string device_summary() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("no CUDA device (") + cudaGetErrorString(err) + ")";
  }
  if (count == 0) return "no CUDA device";
  std::string out;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    if (!out.empty()) out += "\n";
    out += std::to_string(i) + ": " + prop.name + ", sm_" + std::to_string(prop.major) +
           std::to_string(prop.minor) + ", " + std::to_string(prop.totalGlobalMem >> 30) +
           " GiB, " + std::to_string(prop.multiProcessorCount) + " SMs";
  }
  return out;
}

std::string supported_configurations() {
  return "forward: tensor cores (bf16 mma.sync) for bf16 inputs at N, P in {64, 128}, fp32 SIMT "
         "otherwise (any even N <= 128, P <= 128); R in {1, 2, 4, 8}; decode step: fp32 SIMT; " +
         backward_configurations();
}

Status forward(const ForwardArgs& a) {
  Dims d;
  M3_RETURN_IF_ERROR(validate_forward(a, &d));
  M3_RETURN_IF_ERROR(check_supported(d));
  M3_RETURN_IF_ERROR(check_cu_seqlens(a.in, d));
  return launch_forward(a, d);
}

Status backward(const BackwardArgs& a) {
  Dims d;
  M3_RETURN_IF_ERROR(validate_backward(a, &d));
  M3_RETURN_IF_ERROR(check_supported(d));
  M3_RETURN_IF_ERROR(check_cu_seqlens(a.in, d));
  return backward_chunked(a, d);
}

Status step(const StepArgs& a) {
  Dims d;
  M3_RETURN_IF_ERROR(validate_step(a, &d));
  M3_RETURN_IF_ERROR(check_supported(d));
  if (d.B * d.H == 0) return Status::Ok();
  const ForwardArgs f = step_as_forward(a);
  Dims fd;
  M3_RETURN_IF_ERROR(validate_forward(f, &fd));
  const CoreParams p = make_params(f, fd);
  const size_t bytes = step_smem_bytes(p.N, p.P, p.R, p.NA, p.state_vec4);
  if (bytes > 48 * 1024)
    MAMBA3_CHECK_CUDA(
        cudaFuncSetAttribute(step_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  step_kernel<<<static_cast<unsigned>(d.B * d.H), kStepThreads, bytes,
                static_cast<cudaStream_t>(a.stream)>>>(p);
  MAMBA3_CHECK_LAUNCH("step_kernel");
  return Status::Ok();
}

Status forward_staged(const ForwardArgs& h) {
  Staging st;
  ForwardArgs d;
  M3_RETURN_IF_ERROR(st.stage_forward(h, &d));
  M3_RETURN_IF_ERROR(mamba3::forward(d));
  MAMBA3_CHECK_CUDA(cudaDeviceSynchronize());
  const States& f = d.final_states;
  return st.copy_back_all({&d.out, &f.angle, &f.ssm, &f.k, &f.v, &d.saved});
}

Status backward_staged(const BackwardArgs& h) {
  Staging st;
  BackwardArgs d;
  M3_RETURN_IF_ERROR(st.stage_backward(h, &d));
  M3_RETURN_IF_ERROR(mamba3::backward(d));
  MAMBA3_CHECK_CUDA(cudaDeviceSynchronize());
  const Grads& g = d.grads;
  return st.copy_back_all({&g.q, &g.k, &g.v, &g.adt, &g.dt, &g.trap, &g.q_bias, &g.k_bias,
                           &g.angles, &g.d, &g.z, &g.mimo_v, &g.mimo_z, &g.mimo_o,
                           &g.norm_weight, &g.initial.angle, &g.initial.ssm, &g.initial.k,
                           &g.initial.v});
}

Status step_staged(const StepArgs& h) {
  Staging st;
  StepArgs d;
  M3_RETURN_IF_ERROR(st.stage_step(h, &d));
  M3_RETURN_IF_ERROR(mamba3::step(d));
  MAMBA3_CHECK_CUDA(cudaDeviceSynchronize());
  return st.copy_back_all({&d.out, &d.state.angle, &d.state.ssm, &d.state.k, &d.state.v});
}

}  // namespace mamba3::cuda
