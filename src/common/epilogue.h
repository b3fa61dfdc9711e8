// The per-token output stage of DESIGN.md §2.2 (after y = S q + D v): optional per-head RMSNorm
// of each rank's y, the z gate silu(z * zeta_r), and the MIMO rank reduction with phi. Shared by
// the reference (T = double, or float for the naive evaluation) and the cpu lane (T = float).
#pragma once

#include <cmath>
#include <cstdint>

namespace mamba3 {

template <typename T>
struct EpilogueParams {
  int64_t R = 1, P = 0;
  bool reduce = true;            // out (P) = sum_r ...; else out (R, P)
  const T* z = nullptr;          // (P) or null
  const T* zeta = nullptr;       // (R, P) or null (= 1)
  const T* phi = nullptr;        // (R, P) or null (= 1)
  const T* norm_w = nullptr;     // (P) or null (no norm)
  T eps = T(1e-5);
};

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// y (R, P) -> out (P) or (R, P).
template <typename T>
void epilogue_forward(const EpilogueParams<T>& e, const T* y, T* out) {
  if (e.reduce)
    for (int64_t p = 0; p < e.P; ++p) out[p] = T(0);
  for (int64_t r = 0; r < e.R; ++r) {
    const T* yr = y + r * e.P;
    T rstd = T(1);
    if (e.norm_w) {
      T ss = 0;
      for (int64_t p = 0; p < e.P; ++p) ss += yr[p] * yr[p];
      rstd = T(1) / std::sqrt(ss / static_cast<T>(e.P) + e.eps);
    }
    for (int64_t p = 0; p < e.P; ++p) {
      T yn = e.norm_w ? yr[p] * rstd * e.norm_w[p] : yr[p];
      T gate = T(1);
      if (e.z) {
        T u = e.z[p] * (e.zeta ? e.zeta[r * e.P + p] : T(1));
        gate = u * sigmoid(u);
      }
      if (e.reduce)
        out[p] += (e.phi ? e.phi[r * e.P + p] : T(1)) * yn * gate;
      else
        out[r * e.P + p] = yn * gate;
    }
  }
}

// Gradients of the epilogue. dy (R, P) is written; dz (P), dzeta (R, P), dphi (R, P) and
// dnorm_w (P) are accumulated into when non-null.
template <typename T>
void epilogue_backward(const EpilogueParams<T>& e, const T* y, const T* dout, T* dy, T* dz,
                       T* dzeta, T* dphi, T* dnorm_w) {
  for (int64_t r = 0; r < e.R; ++r) {
    const T* yr = y + r * e.P;
    T* dyr = dy + r * e.P;
    T rstd = T(1);
    if (e.norm_w) {
      T ss = 0;
      for (int64_t p = 0; p < e.P; ++p) ss += yr[p] * yr[p];
      rstd = T(1) / std::sqrt(ss / static_cast<T>(e.P) + e.eps);
    }
    for (int64_t p = 0; p < e.P; ++p) {
      const T g = e.reduce ? dout[p] : dout[r * e.P + p];
      const T yn = e.norm_w ? yr[p] * rstd * e.norm_w[p] : yr[p];
      T gate = T(1), dgate_du = T(0), u = T(0);
      if (e.z) {
        const T zeta = e.zeta ? e.zeta[r * e.P + p] : T(1);
        u = e.z[p] * zeta;
        const T s = sigmoid(u);
        gate = u * s;
        dgate_du = s * (T(1) + u * (T(1) - s));
      }
      T gphi = g;
      if (e.reduce) {
        const T phi = e.phi ? e.phi[r * e.P + p] : T(1);
        if (dphi) dphi[r * e.P + p] += g * yn * gate;
        gphi = g * phi;
      }
      const T dyn = gphi * gate;
      if (e.z) {
        const T du = gphi * yn * dgate_du;
        const T zeta = e.zeta ? e.zeta[r * e.P + p] : T(1);
        if (dz) dz[p] += du * zeta;
        if (dzeta) dzeta[r * e.P + p] += du * e.z[p];
      }
      dyr[p] = dyn;  // d(yn); converted through the norm below
    }
    if (e.norm_w) {
      // yn = y * rstd * w:  dy = rstd * (gw - y * rstd^2 * mean(gw * y)), gw = dyn * w.
      T dot = 0;
      for (int64_t p = 0; p < e.P; ++p) dot += dyr[p] * e.norm_w[p] * yr[p];
      const T mean = dot / static_cast<T>(e.P);
      for (int64_t p = 0; p < e.P; ++p) {
        if (dnorm_w) dnorm_w[p] += dyr[p] * yr[p] * rstd;
        dyr[p] = rstd * (dyr[p] * e.norm_w[p] - yr[p] * rstd * rstd * mean);
      }
    }
  }
}

}  // namespace mamba3
