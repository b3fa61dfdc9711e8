// Timing helpers for `mamba3 bench --lane cuda` and the device script: CUDA events around each
// run after warm-up, and the two ceilings of the same run (copy bandwidth, bf16 matmul rate).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/return_if_error.h"
#include "cuda/common/check.cuh"
#include "cuda/common/staging.cuh"
#include "cuda/cuda_lane.h"

namespace mamba3::cuda {
namespace {

// Times `run` (which launches on `stream`) with events; seconds per call.
template <typename F>
Status time_events(cudaStream_t stream, int warmup, int iters, F run, std::vector<double>* out) {
  for (int i = 0; i < warmup; ++i) M3_RETURN_IF_ERROR(run());
  MAMBA3_CHECK_CUDA(cudaStreamSynchronize(stream));
  cudaEvent_t a, b;
  MAMBA3_CHECK_CUDA(cudaEventCreate(&a));
  MAMBA3_CHECK_CUDA(cudaEventCreate(&b));
  out->clear();
  for (int i = 0; i < iters; ++i) {
    MAMBA3_CHECK_CUDA(cudaEventRecord(a, stream));
    Status st = run();
    if (!st.ok()) return st;
    MAMBA3_CHECK_CUDA(cudaEventRecord(b, stream));
    MAMBA3_CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0.f;
    MAMBA3_CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    out->push_back(ms * 1e-3);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return Status::Ok();
}

__global__ void fill_random_bf16(__nv_bfloat16* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 13, x *= 0x5bd1e995u, x ^= x >> 15;
    p[i] = __float2bfloat16(static_cast<float>(x & 0xffff) / 65536.f - 0.5f);
  }
}

}  // namespace

Status time_forward_staged(const ForwardArgs& h, int warmup, int iters,
                           std::vector<double>* seconds) {
  Staging st;
  ForwardArgs d;
  M3_RETURN_IF_ERROR(st.stage_forward(h, &d));
  cudaStream_t stream;
  MAMBA3_CHECK_CUDA(cudaStreamCreate(&stream));
  d.stream = stream;
  Status s = time_events(stream, warmup, iters, [&] { return mamba3::forward(d); }, seconds);
  cudaStreamDestroy(stream);
  return s;
}

Status time_step_staged(const StepArgs& h, int warmup, int iters, int steps, bool graph,
                        std::vector<double>* seconds_per_step) {
  Staging st;
  StepArgs d;
  M3_RETURN_IF_ERROR(st.stage_step(h, &d));
  cudaStream_t stream;
  MAMBA3_CHECK_CUDA(cudaStreamCreate(&stream));
  d.stream = stream;
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    cudaGraph_t g;
    MAMBA3_CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    Status cap = Status::Ok();
    for (int i = 0; i < steps && cap.ok(); ++i) cap = mamba3::step(d);
    MAMBA3_CHECK_CUDA(cudaStreamEndCapture(stream, &g));
    if (!cap.ok()) return cap;
    MAMBA3_CHECK_CUDA(cudaGraphInstantiate(&exec, g, 0));
    cudaGraphDestroy(g);
  }
  auto run = [&]() -> Status {
    if (graph) {
      MAMBA3_CHECK_CUDA(cudaGraphLaunch(exec, stream));
      return Status::Ok();
    }
    for (int i = 0; i < steps; ++i) M3_RETURN_IF_ERROR(mamba3::step(d));
    return Status::Ok();
  };
  Status s = time_events(stream, warmup, iters, run, seconds_per_step);
  for (double& x : *seconds_per_step) x /= steps;
  if (exec) cudaGraphExecDestroy(exec);
  cudaStreamDestroy(stream);
  return s;
}

Status measure_copy_bandwidth(double* bytes_per_s) {
  const size_t bytes = size_t{2} << 30;
  void *a = nullptr, *b = nullptr;
  MAMBA3_CHECK_CUDA(cudaMalloc(&a, bytes));
  MAMBA3_CHECK_CUDA(cudaMalloc(&b, bytes));
  MAMBA3_CHECK_CUDA(cudaMemset(a, 1, bytes));
  std::vector<double> s;
  Status st = time_events(
      nullptr, 3, 10,
      [&]() -> Status {
        MAMBA3_CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, nullptr));
        return Status::Ok();
      },
      &s);
  cudaFree(a);
  cudaFree(b);
  if (!st.ok()) return st;
  std::sort(s.begin(), s.end());
  *bytes_per_s = 2.0 * bytes / s[s.size() / 2];
  return Status::Ok();
}

Status l2_cache_bytes(double* bytes) {
  int dev = 0, l2 = 0;
  MAMBA3_CHECK_CUDA(cudaGetDevice(&dev));
  MAMBA3_CHECK_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  *bytes = static_cast<double>(l2);
  return Status::Ok();
}

Status measure_bf16_matmul(double* flops_per_s) {
  const int n = 8192;
  const size_t elems = size_t{n} * n;
  __nv_bfloat16 *a = nullptr, *b = nullptr, *c = nullptr;
  MAMBA3_CHECK_CUDA(cudaMalloc(&a, elems * 2));
  MAMBA3_CHECK_CUDA(cudaMalloc(&b, elems * 2));
  MAMBA3_CHECK_CUDA(cudaMalloc(&c, elems * 2));
  fill_random_bf16<<<1024, 256>>>(a, elems, 1u);
  fill_random_bf16<<<1024, 256>>>(b, elems, 2u);
  MAMBA3_CHECK_LAUNCH("fill_random_bf16");
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) return Status::Internal("cublasCreate failed");
  const float alpha = 1.f, beta = 0.f;
  std::vector<double> s;
  Status st = time_events(
      nullptr, 3, 10,
      [&]() -> Status {
        cublasStatus_t r = cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a,
                                        CUDA_R_16BF, n, b, CUDA_R_16BF, n, &beta, c, CUDA_R_16BF,
                                        n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        if (r != CUBLAS_STATUS_SUCCESS) return Status::Internal("cublasGemmEx failed");
        return Status::Ok();
      },
      &s);
  cublasDestroy(handle);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  if (!st.ok()) return st;
  std::sort(s.begin(), s.end());
  *flops_per_s = 2.0 * n * static_cast<double>(n) * n / s[s.size() / 2];
  return Status::Ok();
}

}  // namespace mamba3::cuda
