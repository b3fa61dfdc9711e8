// CUDA error handling: every runtime call is wrapped; a failure becomes a Status naming the call.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "mamba3/mamba3.h"

#define MAMBA3_CHECK_CUDA(expr)                                                        \
  do {                                                                                 \
    cudaError_t _e = (expr);                                                           \
    if (_e != cudaSuccess)                                                             \
      return ::mamba3::Status::Internal(std::string("CUDA error in ") + #expr + ": " + \
                                        cudaGetErrorString(_e));                       \
  } while (0)

// After a launch: launch-configuration errors (and earlier asynchronous ones).
#define MAMBA3_CHECK_LAUNCH(name)                                                          \
  do {                                                                                     \
    cudaError_t _e = cudaGetLastError();                                                   \
    if (_e != cudaSuccess)                                                                 \
      return ::mamba3::Status::Internal(std::string("CUDA launch of ") + (name) + ": " +   \
                                        cudaGetErrorString(_e));                           \
  } while (0)
