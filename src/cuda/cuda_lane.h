// The CUDA (sm_90a) lane as seen from the dispatch in src/core: no CUDA types here, so the core
// compiles the same with or without CUDA. Built from dispatch.cu when the build has CUDA, from
// cuda_lane_stub.cpp otherwise.
#pragma once

#include <string>
#include <vector>

#include "core/validate.h"
#include "mamba3/mamba3.h"

namespace mamba3::cuda {

// True when this build contains the CUDA lane (MAMBA3_ENABLE_CUDA=ON).
bool compiled();
// Visible CUDA devices; 0 when the build has no CUDA, there is no driver or no device, or the
// runtime reports any error. Never aborts.
int device_count();
// One line per device ("0: NVIDIA H200, sm_90, 139 GiB"), or why there is none.
std::string device_summary();
// Which (N, P, R) the kernels of this build serve, in words (for `mamba3 info`).
std::string supported_configurations();

// Returns the unused memory of the lane's workspace pools to the driver (mamba3.h:
// release_cached_memory).
Status release_workspace(size_t* released_bytes);

// Float32 elements of ForwardArgs::saved for these (validated) inputs: 0 unless the forward and
// the backward both take the tensor-core kernels and MAMBA3_CUDA_SAVE_TILES is not 0; then the
// tile records, chunk-start states and decays of every (chunk, head) (cuda/common/
// tile_record.cuh). Queries the device; errors name a bad gate value.
Status saved_numel(const Inputs& in, const Dims& dims, int64_t* numel);

// Arguments are already validated by the caller (mamba3::validate); tensors on the GPU.
Status forward(const ForwardArgs& args);
Status backward(const BackwardArgs& args);
Status step(const StepArgs& args);

// Host-staged runs for tools and tests: every CPU tensor of `args` is copied to the GPU, the
// cuda lane runs, and the outputs (out, final states / updated states, gradients) are copied
// back into the host tensors. Synchronous; allocates. Not for production paths.
Status forward_staged(const ForwardArgs& host_args);
// saved_numel of a host-staged forward (the inputs as forward_staged puts them on the device).
Status saved_numel_staged(const ForwardArgs& host_args, int64_t* numel);
Status backward_staged(const BackwardArgs& host_args);
Status step_staged(const StepArgs& host_args);

}  // namespace mamba3::cuda

namespace mamba3::cuda {

// Benchmark support (CUDA events around each run, after warm-up; inputs staged once).
// Seconds per forward call.
Status time_forward_staged(const ForwardArgs& host_args, int warmup, int iters,
                           std::vector<double>* seconds);
// Seconds per backward call (inputs, cotangents and gradient buffers staged once).
Status time_backward_staged(const BackwardArgs& host_args, int warmup, int iters,
                            std::vector<double>* seconds);
// Seconds per decode step: `steps` consecutive steps per timed run, launched directly or as one
// captured CUDA graph (`graph`), states updated in place.
Status time_step_staged(const StepArgs& host_args, int warmup, int iters, int steps, bool graph,
                        std::vector<double>* seconds_per_step);
// Device-to-device copy bandwidth (bytes read + written per second) of a large cudaMemcpy.
Status measure_copy_bandwidth(double* bytes_per_s);
// Dense bf16 matrix-multiply rate (FLOP/s) of cuBLAS at 8192^3 on random data.
Status measure_bf16_matmul(double* flops_per_s);
// L2 cache size of the current device in bytes (benchmarks: a working set that fits there is
// not timed against DRAM).
Status l2_cache_bytes(double* bytes);

}  // namespace mamba3::cuda
