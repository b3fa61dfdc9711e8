// Runtime dispatch of the CUDA lane: checks the configuration against what the kernels serve,
// sets up shared memory and launches; host-staged wrappers for tools and tests.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/return_if_error.h"
#include "core/step_view.h"
#include "core/validate.h"
#include "cuda/chunk_bwd/bwd_dispatch.h"
#include "cuda/chunk_fwd/fwd_kernel.cuh"
#include "cuda/chunk_fwd_tc/fwd_tc_launch.cuh"
#include "cuda/common/check.cuh"
#include "cuda/common/launch.cuh"
#include "cuda/common/staging.cuh"
#include "cuda/common/workspace.h"
#include "cuda/cuda_lane.h"
#include "cuda/step/step_launch.cuh"

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

// Packed sequences live on the device; validation could not read them, so check them here
// (one small synchronous copy) and report the longest sequence for the segment split.
Status check_cu_seqlens(const Inputs& in, const Dims& d, int64_t* max_len) {
  *max_len = d.L;
  if (!in.cu_seqlens.defined()) return Status::Ok();
  std::vector<int32_t> cu(d.S + 1);
  MAMBA3_CHECK_CUDA(cudaMemcpy2D(cu.data(), sizeof(int32_t), in.cu_seqlens.data,
                                 sizeof(int32_t) * in.cu_seqlens.strides[0], sizeof(int32_t),
                                 d.S + 1, cudaMemcpyDeviceToHost));
  if (cu[0] != 0) return Status::InvalidArgument("cu_seqlens: must start at 0");
  *max_len = 0;
  for (int64_t s = 0; s < d.S; ++s) {
    if (cu[s + 1] < cu[s]) return Status::InvalidArgument("cu_seqlens: must be non-decreasing");
    *max_len = std::max<int64_t>(*max_len, cu[s + 1] - cu[s]);
  }
  if (cu[d.S] != d.L)
    return Status::InvalidArgument("cu_seqlens: must end at L = " + std::to_string(d.L));
  return Status::Ok();
}

// The saved buffer's layout for these inputs (bytes 0: the lane saves nothing for them).
Status saved_plan(const Inputs& in, const Dims& d, SavedLayout* l) {
  ForwardArgs f;
  f.in = in;
  return saved_layout_for(in, d, fwd_tc::forward_uses_tensor_cores(in, d, make_params(f, d)), l);
}

Status launch_forward(const ForwardArgs& a, const Dims& d, int64_t max_len) {
  if (d.S * d.H == 0) return Status::Ok();
  const CoreParams p = make_params(a, d);
  const cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  SavedPtrs sv;
  M3_RETURN_IF_ERROR(fwd_tc::forward_saved_ptrs(a, d, &sv));
  if (fwd_tc::forward_uses_tensor_cores(a.in, d, p))
    return fwd_tc::launch_forward_tc(p, d, max_len, sv, stream);
  M3_RETURN_IF_ERROR(psiv_cache_refused("forward", "the fp32 SIMT kernel"));
  if (sv.base)
    return Status::Internal("saved: a saved buffer for a forward off the tensor-core path");
  const FwdSmem lay = fwd_smem_layout(p.N, p.P, p.NA);
  const size_t bytes = sizeof(float) * lay.total_floats;
  M3_RETURN_IF_ERROR(allow_smem(fwd_kernel, bytes));
  fwd_kernel<<<static_cast<unsigned>(d.S * d.H), kFwdThreads, bytes,
               static_cast<cudaStream_t>(a.stream)>>>(p, lay);
  MAMBA3_CHECK_LAUNCH("fwd_kernel");
  return Status::Ok();
}



}  // namespace

bool compiled() { return true; }

Status release_workspace(size_t* released_bytes) {
  size_t n = 0;
  MAMBA3_CHECK_CUDA(workspace_trim(&n));
  if (released_bytes) *released_bytes = n;
  return Status::Ok();
}

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
  return "forward: tensor cores (bf16 mma.sync, cp.async pipeline, sequence split when the grid "
         "is small) for bf16 q, k, v with 16-byte aligned contiguous rows at N, P in {64, 128}, "
         "fp32 SIMT otherwise (any even N <= 128, P <= 128); R in {1, 2, 4, 8}; decode step: fp32 "
         "state streamed once (float4 rows at N in {64, 128}, P % 16 == 0: persistent CTAs with "
         "the next (batch, head) prefetched when q, k, v, z, trap share a dtype and the rest is "
         "fp32 (MAMBA3_CUDA_STEP_PERSISTENT=0: one CTA per (batch, head)); a general kernel "
         "otherwise); " +
         backward_configurations();
}

Status saved_numel(const Inputs& in, const Dims& d, int64_t* numel) {
  SavedLayout l;
  M3_RETURN_IF_ERROR(saved_plan(in, d, &l));
  *numel = l.bytes / 4;
  return Status::Ok();
}

Status forward(const ForwardArgs& a) {
  Dims d;
  M3_RETURN_IF_ERROR(validate_forward(a, &d));
  M3_RETURN_IF_ERROR(check_supported(d));
  int64_t max_len = 0;
  M3_RETURN_IF_ERROR(check_cu_seqlens(a.in, d, &max_len));
  return launch_forward(a, d, max_len);
}

Status backward(const BackwardArgs& a) {
  Dims d;
  M3_RETURN_IF_ERROR(validate_backward(a, &d));
  M3_RETURN_IF_ERROR(check_supported(d));
  int64_t max_len = 0;
  M3_RETURN_IF_ERROR(check_cu_seqlens(a.in, d, &max_len));
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
  return decode::launch_step(a, d, p, static_cast<cudaStream_t>(a.stream));
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

Status saved_numel_staged(const ForwardArgs& h, int64_t* numel) {
  // The size depends on where the tensors live (alignment): ask with staged copies.
  ForwardArgs hs = h;
  hs.saved = Tensor{};
  Staging st;
  ForwardArgs d;
  M3_RETURN_IF_ERROR(st.stage_forward(hs, &d));
  return mamba3::saved_numel(d, numel);
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
