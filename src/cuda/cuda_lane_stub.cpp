// The CUDA lane of a build without CUDA: reports itself absent and refuses every call.
#include "cuda/cuda_lane.h"

namespace mamba3::cuda {
namespace {

Status no_cuda() {
  return Status::NotSupported(
      "cuda lane: this build has no CUDA (configure with MAMBA3_ENABLE_CUDA=ON and nvcc)");
}

}  // namespace

bool compiled() { return false; }
int device_count() { return 0; }
std::string device_summary() { return "this build has no CUDA"; }
std::string supported_configurations() { return "none (no CUDA in this build)"; }
Status release_workspace(size_t* released_bytes) {
  if (released_bytes) *released_bytes = 0;
  return Status::Ok();
}

Status saved_numel(const Inputs&, const Dims&, int64_t*) { return no_cuda(); }
Status forward(const ForwardArgs&) { return no_cuda(); }
Status backward(const BackwardArgs&) { return no_cuda(); }
Status step(const StepArgs&) { return no_cuda(); }
Status forward_staged(const ForwardArgs&) { return no_cuda(); }
Status saved_numel_staged(const ForwardArgs&, int64_t*) { return no_cuda(); }
Status backward_staged(const BackwardArgs&) { return no_cuda(); }
Status step_staged(const StepArgs&) { return no_cuda(); }
Status time_forward_staged(const ForwardArgs&, int, int, std::vector<double>*) { return no_cuda(); }
Status time_backward_staged(const BackwardArgs&, int, int, std::vector<double>*) {
  return no_cuda();
}
Status time_step_staged(const StepArgs&, int, int, int, bool, std::vector<double>*) {
  return no_cuda();
}
Status measure_copy_bandwidth(double*) { return no_cuda(); }
Status measure_bf16_matmul(double*) { return no_cuda(); }
Status l2_cache_bytes(double*) { return no_cuda(); }

}  // namespace mamba3::cuda
