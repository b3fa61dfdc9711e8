// The CUDA (sm_90a) lane as seen from the dispatch in src/core: no CUDA types here, so the core
// compiles the same with or without CUDA. Built from dispatch.cu when the build has CUDA, from
// cuda_lane_stub.cpp otherwise.
#pragma once

#include <string>

#include "mamba3/mamba3.h"

namespace mamba3::cuda {

// True when this build contains the CUDA lane (MAMBA3_ENABLE_CUDA=ON).
bool compiled();
// Visible CUDA devices; 0 when the build has no CUDA, there is no driver or no device, or the
// runtime reports any error. Never aborts.
int device_count();
// One line per device ("0: NVIDIA H200, sm_90, 139 GiB"), or why there is none.
std::string device_summary();

// Arguments are already validated by the caller (mamba3::validate).
Status forward(const ForwardArgs& args);
Status backward(const BackwardArgs& args);
Status step(const StepArgs& args);

}  // namespace mamba3::cuda
