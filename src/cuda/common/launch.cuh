// Host helpers of the kernel launchers (forward, backward and decode dispatch). Also compiled as
// plain C++ by the CPU emulation tests (MAMBA3_CUDA_EMU): there the device is an H200's 132 SMs
// and kernel attributes are not set.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>

#include "mamba3/mamba3.h"

#ifndef MAMBA3_CUDA_EMU
#include "cuda/common/check.cuh"
#endif

namespace mamba3::cuda {

// A positive integer from environment variable `name` (0 when unset); anything else is an error.
inline Status env_positive(const char* name, int* value) {
  *value = 0;
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return Status::Ok();
  char* endp = nullptr;
  const long long v = std::strtoll(env, &endp, 10);
  if (*endp != '\0' || v <= 0 || v > INT_MAX)
    return Status::InvalidArgument(std::string(name) + ": expected a positive integer, got '" +
                                   env + "'");
  *value = static_cast<int>(v);
  return Status::Ok();
}

// A cuda-lane gate that is on unless its variable is "0": unset, empty or "1" leave it on;
// anything else is an error naming the variable.
inline Status default_on_gate(const char* name, bool* on) {
  *on = true;
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0' || std::strcmp(env, "1") == 0) return Status::Ok();
  if (std::strcmp(env, "0") == 0) {
    *on = false;
    return Status::Ok();
  }
  return Status::InvalidArgument(std::string(name) + ": expected 0 or 1, got '" + env + "'");
}

// SMs of the current device (132, an H200's, where the query fails).
inline int sm_count() {
#ifdef MAMBA3_CUDA_EMU
  return 132;
#else
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    return 132;
  }
  return sms;
#endif
}

// Lets `kernel` take `bytes` of dynamic shared memory where that is beyond the 48 KB default.
template <typename Kernel>
inline Status allow_smem(Kernel kernel, size_t bytes) {
#ifdef MAMBA3_CUDA_EMU
  (void)kernel, (void)bytes;
#else
  if (bytes > 48 * 1024)
    MAMBA3_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes)));
#endif
  return Status::Ok();
}

// As allow_smem, and the largest shared-memory carveout, so that kernels sized for several CTAs
// per SM by their shared memory get them.
template <typename Kernel>
inline Status allow_smem_max_carveout(Kernel kernel, size_t bytes) {
  Status st = allow_smem(kernel, bytes);
  if (!st.ok()) return st;
#ifndef MAMBA3_CUDA_EMU
  MAMBA3_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                         cudaSharedmemCarveoutMaxShared));
#endif
  return Status::Ok();
}

}  // namespace mamba3::cuda
