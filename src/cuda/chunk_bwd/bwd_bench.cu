// Timing of the cuda backward for `mamba3 bench --lane cuda --what bwd`: buffers staged once,
// CUDA events around each call after warm-up.
#include <cuda_runtime.h>

#include <vector>

#include "cuda/common/check.cuh"
#include "cuda/common/staging.cuh"
#include "cuda/cuda_lane.h"

namespace mamba3::cuda {

Status time_backward_staged(const BackwardArgs& h, int warmup, int iters,
                            std::vector<double>* seconds) {
  Staging st;
  BackwardArgs d;
  Status s = st.stage_backward(h, &d);
  if (!s.ok()) return s;
  cudaStream_t stream;
  MAMBA3_CHECK_CUDA(cudaStreamCreate(&stream));
  d.stream = stream;
  cudaEvent_t a = nullptr, b = nullptr;
  auto run_all = [&]() -> Status {
    for (int i = 0; i < warmup; ++i) {
      Status r = mamba3::backward(d);
      if (!r.ok()) return r;
    }
    MAMBA3_CHECK_CUDA(cudaStreamSynchronize(stream));
    MAMBA3_CHECK_CUDA(cudaEventCreate(&a));
    MAMBA3_CHECK_CUDA(cudaEventCreate(&b));
    seconds->clear();
    for (int i = 0; i < iters; ++i) {
      MAMBA3_CHECK_CUDA(cudaEventRecord(a, stream));
      Status r = mamba3::backward(d);
      if (!r.ok()) return r;
      MAMBA3_CHECK_CUDA(cudaEventRecord(b, stream));
      MAMBA3_CHECK_CUDA(cudaEventSynchronize(b));
      float ms = 0.f;
      MAMBA3_CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
      seconds->push_back(ms * 1e-3);
    }
    return Status::Ok();
  };
  s = run_all();
  if (a) cudaEventDestroy(a);
  if (b) cudaEventDestroy(b);
  cudaStreamDestroy(stream);
  return s;
}

}  // namespace mamba3::cuda
