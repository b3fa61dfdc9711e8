// The cuda lane's workspace pools (src/cuda/common/workspace.h).
#include "cuda/common/workspace.h"

#include <cstdint>
#include <mutex>

namespace mamba3::cuda {
namespace {

constexpr int kMaxDevices = 64;
std::mutex g_mutex;
cudaMemPool_t g_pools[kMaxDevices] = {};  // never destroyed: they live as long as the process

cudaError_t pool_of(cudaStream_t stream, cudaMemPool_t* pool) {
  int dev = 0;
  cudaError_t e = cudaStreamGetDevice(stream, &dev);
  if (e != cudaSuccess) return e;
  if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_pools[dev]) {
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = dev;
    cudaMemPool_t p = nullptr;
    e = cudaMemPoolCreate(&p, &props);
    if (e != cudaSuccess) return e;
    uint64_t keep = UINT64_MAX;  // keep freed memory across synchronizations
    e = cudaMemPoolSetAttribute(p, cudaMemPoolAttrReleaseThreshold, &keep);
    if (e != cudaSuccess) {
      cudaMemPoolDestroy(p);
      return e;
    }
    g_pools[dev] = p;
  }
  *pool = g_pools[dev];
  return cudaSuccess;
}

}  // namespace

cudaError_t workspace_alloc(void** ptr, size_t bytes, cudaStream_t stream) {
  // Inside a stream capture the allocation becomes a graph allocation node owned by the graph,
  // so no pool keeps it either way; and the driver rejects explicit pools there (H200,
  // CUDA 13.0: cudaMallocFromPoolAsync during capture fails with "operation not permitted when
  // stream is capturing" and invalidates the capture). cudaMallocAsync is capturable.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaError_t e = cudaStreamIsCapturing(stream, &capture);
  if (e != cudaSuccess) return e;
  if (capture == cudaStreamCaptureStatusActive) return cudaMallocAsync(ptr, bytes, stream);
  cudaMemPool_t pool = nullptr;
  e = pool_of(stream, &pool);
  if (e != cudaSuccess) return e;
  return cudaMallocFromPoolAsync(ptr, bytes, pool, stream);
}

cudaError_t workspace_trim(size_t* released) {
  std::lock_guard<std::mutex> lock(g_mutex);
  size_t total = 0;
  for (cudaMemPool_t p : g_pools) {
    if (!p) continue;
    uint64_t reserved = 0, used = 0;
    cudaError_t e = cudaMemPoolGetAttribute(p, cudaMemPoolAttrReservedMemCurrent, &reserved);
    if (e == cudaSuccess) e = cudaMemPoolGetAttribute(p, cudaMemPoolAttrUsedMemCurrent, &used);
    if (e == cudaSuccess) e = cudaMemPoolTrimTo(p, 0);
    if (e != cudaSuccess) return e;
    total += reserved > used ? reserved - used : 0;
  }
  if (released) *released = total;
  return cudaSuccess;
}

}  // namespace mamba3::cuda
