// Scalar conversions between the storage dtypes and float/double, and strided element access.
// Internal to the library; no CUDA or framework types.
#pragma once

#include <cstdint>
#include <bit>
#include <cstring>

#include "mamba3/mamba3.h"

namespace mamba3 {

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_float(uint16_t h) { return static_cast<float>(std::bit_cast<_Float16>(h)); }
inline uint16_t float_to_f16(float f) { return std::bit_cast<uint16_t>(static_cast<_Float16>(f)); }

// Element `offset` (in elements) of a buffer of `dtype`, as double.
inline double load_as_double(const void* base, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kF32: return static_cast<const float*>(base)[offset];
    case DType::kF64: return static_cast<const double*>(base)[offset];
    case DType::kBF16: return bf16_to_float(static_cast<const uint16_t*>(base)[offset]);
    case DType::kF16: return f16_to_float(static_cast<const uint16_t*>(base)[offset]);
    case DType::kI32: return static_cast<const int32_t*>(base)[offset];
  }
  return 0.0;
}

// Stores `value` rounded to `dtype` (float64 -> float32 -> bf16/f16 rounds twice; the first
// rounding is exact for values that came from float32 arithmetic).
inline void store_from_double(void* base, DType dtype, int64_t offset, double value) {
  switch (dtype) {
    case DType::kF32: static_cast<float*>(base)[offset] = static_cast<float>(value); break;
    case DType::kF64: static_cast<double*>(base)[offset] = value; break;
    case DType::kBF16:
      static_cast<uint16_t*>(base)[offset] = float_to_bf16(static_cast<float>(value));
      break;
    case DType::kF16:
      static_cast<uint16_t*>(base)[offset] = float_to_f16(static_cast<float>(value));
      break;
    case DType::kI32: static_cast<int32_t*>(base)[offset] = static_cast<int32_t>(value); break;
  }
}

// Element offset of a multi-index.
inline int64_t offset_of(const Tensor& t, std::initializer_list<int64_t> idx) {
  int64_t off = 0;
  int d = 0;
  for (int64_t i : idx) off += i * t.strides[d++];
  return off;
}

template <typename... I>
inline double tget(const Tensor& t, I... idx) {
  return load_as_double(t.data, t.dtype, offset_of(t, {static_cast<int64_t>(idx)...}));
}

template <typename... I>
inline void tset(const Tensor& t, double value, I... idx) {
  store_from_double(t.data, t.dtype, offset_of(t, {static_cast<int64_t>(idx)...}), value);
}

}  // namespace mamba3
