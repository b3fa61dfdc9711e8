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

Status forward(const ForwardArgs&) { return no_cuda(); }
Status backward(const BackwardArgs&) { return no_cuda(); }
Status step(const StepArgs&) { return no_cuda(); }

}  // namespace mamba3::cuda
