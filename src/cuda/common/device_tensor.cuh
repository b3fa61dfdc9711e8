// Device-side views of the public Tensor: pointer, dtype and element strides, passed by value
// to kernels. Loads convert any accepted storage dtype to float; stores round from float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mamba3/mamba3.h"

namespace mamba3::cuda {

struct DTensor {
  void* data = nullptr;
  DType dtype = DType::kF32;
  int ndim = -1;  // -1: absent
  int64_t stride[kMaxDims] = {};

  __host__ __device__ bool defined() const { return ndim >= 0; }
};

inline DTensor to_device_view(const Tensor& t) {
  DTensor d;
  if (!t.defined()) return d;
  d.data = t.data;
  d.dtype = t.dtype;
  d.ndim = t.ndim;
  for (int i = 0; i < t.ndim && i < kMaxDims; ++i) d.stride[i] = t.strides[i];
  return d;
}

__device__ __forceinline__ float dload(const DTensor& t, int64_t off) {
  switch (t.dtype) {
    case DType::kF32: return static_cast<const float*>(t.data)[off];
    case DType::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(t.data)[off]);
    case DType::kF16: return __half2float(static_cast<const __half*>(t.data)[off]);
    case DType::kF64: return static_cast<float>(static_cast<const double*>(t.data)[off]);
    case DType::kI32: return static_cast<float>(static_cast<const int32_t*>(t.data)[off]);
  }
  return 0.f;
}

// Read-only path (non-coherent cache): for tensors no thread writes during the kernel (the
// inputs and parameters, never the states), so loads can be reordered past shared-memory stores.
__device__ __forceinline__ float dload_ro(const DTensor& t, int64_t off) {
  switch (t.dtype) {
    case DType::kF32: return __ldg(static_cast<const float*>(t.data) + off);
    case DType::kBF16: {
      const unsigned short raw = __ldg(static_cast<const unsigned short*>(t.data) + off);
      return __uint_as_float(static_cast<unsigned int>(raw) << 16);
    }
    case DType::kF16: return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(t.data) + off)));
    case DType::kF64: return static_cast<float>(__ldg(static_cast<const double*>(t.data) + off));
    case DType::kI32: return static_cast<float>(__ldg(static_cast<const int32_t*>(t.data) + off));
  }
  return 0.f;
}

__device__ __forceinline__ double dload_f64(const DTensor& t, int64_t off) {
  if (t.dtype == DType::kF64) return static_cast<const double*>(t.data)[off];
  return static_cast<double>(dload(t, off));
}

__device__ __forceinline__ void dstore(const DTensor& t, int64_t off, float v) {
  switch (t.dtype) {
    case DType::kF32: static_cast<float*>(t.data)[off] = v; break;
    case DType::kBF16: static_cast<__nv_bfloat16*>(t.data)[off] = __float2bfloat16_rn(v); break;
    case DType::kF16: static_cast<__half*>(t.data)[off] = __float2half_rn(v); break;
    case DType::kF64: static_cast<double*>(t.data)[off] = static_cast<double>(v); break;
    case DType::kI32: static_cast<int32_t*>(t.data)[off] = static_cast<int32_t>(v); break;
  }
}

__device__ __forceinline__ void dstore_f64(const DTensor& t, int64_t off, double v) {
  if (t.dtype == DType::kF64)
    static_cast<double*>(t.data)[off] = v;
  else
    dstore(t, off, static_cast<float>(v));
}

// The dtype switch of dstore / dload_ro taken once around a loop instead of per element:
// f(st) with st(off, v) storing as dstore(t, off, v) does; f(ld) with ld(off) returning
// dload_ro(t, off). bf16 and fp32 get their own instance of f, other dtypes the generic one.
template <typename F>
__device__ __forceinline__ void with_store(const DTensor& t, F&& f) {
  if (t.dtype == DType::kBF16) {
    __nv_bfloat16* d = static_cast<__nv_bfloat16*>(t.data);
    f([d](int64_t off, float v) { d[off] = __float2bfloat16_rn(v); });
  } else if (t.dtype == DType::kF32) {
    float* d = static_cast<float*>(t.data);
    f([d](int64_t off, float v) { d[off] = v; });
  } else {
    f([&t](int64_t off, float v) { dstore(t, off, v); });
  }
}

template <typename F>
__device__ __forceinline__ void with_load_ro(const DTensor& t, F&& f) {
  if (t.dtype == DType::kBF16) {
    const unsigned short* s = static_cast<const unsigned short*>(t.data);
    f([s](int64_t off) { return __uint_as_float(static_cast<unsigned int>(__ldg(s + off)) << 16); });
  } else if (t.dtype == DType::kF32) {
    const float* s = static_cast<const float*>(t.data);
    f([s](int64_t off) { return __ldg(s + off); });
  } else {
    f([&t](int64_t off) { return dload_ro(t, off); });
  }
}

// q/k (B, L, R, G, N) or (B, L, G, N).
__device__ __forceinline__ int64_t qk_off(const DTensor& t, int64_t b, int64_t l, int64_t r,
                                          int64_t g, int64_t n) {
  if (t.ndim == 4) return b * t.stride[0] + l * t.stride[1] + g * t.stride[2] + n * t.stride[3];
  return b * t.stride[0] + l * t.stride[1] + r * t.stride[2] + g * t.stride[3] + n * t.stride[4];
}
// biases (H, R, N) or (H, N).
__device__ __forceinline__ int64_t bias_off(const DTensor& t, int64_t h, int64_t r, int64_t n) {
  if (t.ndim == 2) return h * t.stride[0] + n * t.stride[1];
  return h * t.stride[0] + r * t.stride[1] + n * t.stride[2];
}
// state k (S, R, H, N) or (S, H, N).
__device__ __forceinline__ int64_t sk_off(const DTensor& t, int64_t s, int64_t r, int64_t h,
                                          int64_t n) {
  if (t.ndim == 3) return s * t.stride[0] + h * t.stride[1] + n * t.stride[2];
  return s * t.stride[0] + r * t.stride[1] + h * t.stride[2] + n * t.stride[3];
}

}  // namespace mamba3::cuda
