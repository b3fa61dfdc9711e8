// Index helpers shared by the CPU-side lanes: element offsets of the core tensors in either of
// their accepted layouts, rope pairing, and flat row-major accumulators written back through
// arbitrary strides.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/numeric.h"
#include "core/validate.h"
#include "mamba3/mamba3.h"

namespace mamba3 {

// q/k: (B, L, R, G, N) or (B, L, G, N).
inline int64_t qk_offset(const Tensor& t, int64_t b, int64_t l, int64_t r, int64_t g, int64_t n) {
  if (t.ndim == 4) return b * t.strides[0] + l * t.strides[1] + g * t.strides[2] + n * t.strides[3];
  return b * t.strides[0] + l * t.strides[1] + r * t.strides[2] + g * t.strides[3] +
         n * t.strides[4];
}
// Step q/k: (B, R, G, N) or (B, G, N).
inline int64_t step_qk_offset(const Tensor& t, int64_t b, int64_t r, int64_t g, int64_t n) {
  if (t.ndim == 3) return b * t.strides[0] + g * t.strides[1] + n * t.strides[2];
  return b * t.strides[0] + r * t.strides[1] + g * t.strides[2] + n * t.strides[3];
}
// Biases (H, R, N) or (H, N).
inline int64_t bias_offset(const Tensor& t, int64_t h, int64_t r, int64_t n) {
  if (t.ndim == 2) return h * t.strides[0] + n * t.strides[1];
  return h * t.strides[0] + r * t.strides[1] + n * t.strides[2];
}
// State k (S, R, H, N) or (S, H, N).
inline int64_t state_k_offset(const Tensor& t, int64_t s, int64_t r, int64_t h, int64_t n) {
  if (t.ndim == 3) return s * t.strides[0] + h * t.strides[1] + n * t.strides[2];
  return s * t.strides[0] + r * t.strides[1] + h * t.strides[2] + n * t.strides[3];
}

inline double load(const Tensor& t, int64_t off) { return load_as_double(t.data, t.dtype, off); }
inline void store(const Tensor& t, int64_t off, double v) { store_from_double(t.data, t.dtype, off, v); }

// Rope pair i of an N-vector: indices (a, b) rotated as a' = a cos - b sin, b' = a sin + b cos.
inline void rope_pair(RopePairing p, int64_t N, int64_t i, int64_t* a, int64_t* b) {
  if (p == RopePairing::kInterleaved) {
    *a = 2 * i;
    *b = 2 * i + 1;
  } else {
    *a = i;
    *b = i + N / 2;
  }
}

// A float accumulator shaped like a tensor (row-major), flushed through the tensor's strides.
template <typename T>
struct Accum {
  std::vector<T> v;
  std::vector<int64_t> shape;
  bool on = false;

  void init(const Tensor& t) {
    on = t.defined();
    if (!on) return;
    shape.assign(t.shape, t.shape + t.ndim);
    v.assign(static_cast<size_t>(t.numel()), T(0));
  }
  T& operator[](int64_t i) { return v[static_cast<size_t>(i)]; }
  void flush(const Tensor& t) const {
    if (!on || t.numel() == 0) return;
    std::vector<int64_t> idx(shape.size(), 0);
    for (size_t i = 0; i < v.size(); ++i) {
      int64_t off = 0;
      for (size_t d = 0; d < shape.size(); ++d) off += idx[d] * t.strides[d];
      store(t, off, static_cast<double>(v[i]));
      for (size_t d = shape.size(); d-- > 0;) {
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
    }
  }
};

inline constexpr double kPi = 3.14159265358979323846;

// Wraps an angle into [0, 2*pi).
template <typename T>
inline T wrap_angle(T x) {
  const T two_pi = static_cast<T>(2.0 * kPi);
  T w = std::fmod(x, two_pi);
  if (w < T(0)) w += two_pi;
  if (w >= two_pi) w = T(0);
  return w;
}

}  // namespace mamba3
