// Runtime dispatch of the CUDA lane: maps runtime values to the compiled kernel set. No kernels
// are compiled yet (issues 4/5); every compute entry point refuses with a clear status.
#include <cuda_runtime.h>

#include <string>

#include "cuda/cuda_lane.h"

namespace mamba3::cuda {
namespace {

Status not_implemented() {
  return Status::NotSupported("cuda lane: kernels not implemented in this build yet (issue 4/5)");
}

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

Status forward(const ForwardArgs&) { return not_implemented(); }
Status backward(const BackwardArgs&) { return not_implemented(); }
Status step(const StepArgs&) { return not_implemented(); }

}  // namespace mamba3::cuda
