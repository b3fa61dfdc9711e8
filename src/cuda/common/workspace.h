// Stream-ordered workspace of the cuda lane: one memory pool per device, owned by the library,
// that keeps freed memory for the next call. The device's default pool (what cudaMallocAsync
// draws from) has a release threshold of 0: at every synchronization it hands its unused memory
// back to the driver, so a backward of a few GB remapped all of it on each call (the eager vs
// CUDA-graph gap of the H200 peers runs: 4.6 ms of 26.9 at `train`). Allocations stay
// stream-ordered and capturable (inside a capture they become graph allocation nodes, taken
// with cudaMallocAsync: the driver refuses explicit pools during capture).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace mamba3::cuda {

// cudaMallocFromPoolAsync from the pool of `stream`'s device (created on first use); during an
// active stream capture cudaMallocAsync instead (a graph allocation node either way).
cudaError_t workspace_alloc(void** ptr, size_t bytes, cudaStream_t stream);
// Returns every pool's unused memory to the driver (cudaMemPoolTrimTo 0); `*released` (may be
// null) gets the bytes the pools held before. Memory still allocated stays.
cudaError_t workspace_trim(size_t* released);

}  // namespace mamba3::cuda
