// Random problems of a given configuration: realistic input distributions (RMS-normed q/k,
// softplus dt, negative A*dt, ...), fresh draws from a seed, plus output/grad buffers shaped
// for the configuration. Used by the CLI (demo, bench), the golden runner's tolerance and the
// tests. Not part of the public API.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "check/host_tensor.h"
#include "mamba3/mamba3.h"

namespace mamba3::check {

struct ProblemConfig {
  int64_t B = 1, L = 64, H = 2, G = 1, N = 32, P = 16, R = 1, NA = 8;
  bool has_d = true, has_z = true;
  bool has_mimo_v = false, has_mimo_z = false, has_mimo_o = false;  // MIMO projections
  bool has_norm = false;    // fused output RMSNorm weight (H, P)
  bool has_states = false;  // initial states
  bool siso_layout = true;  // R == 1: q/k as (B, L, G, N), biases (H, N), state k (S, H, N)
  std::vector<int32_t> seqlens;  // non-empty: packed sequences (requires B == 1, sum == L)
  DType dtype = DType::kF32;     // dtype of q, k, v, z, trap (and of out)
  RopePairing rope_pairing = RopePairing::kInterleaved;
  uint64_t seed = 0;

  int64_t S() const { return seqlens.empty() ? B : static_cast<int64_t>(seqlens.size()); }
  // "B=1 L=64 H=2 G=1 N=32 P=16 R=1 NA=8 bf16 ..."
  std::string describe() const;
};

// MIMO with all projections on (R > 1), SISO otherwise.
ProblemConfig default_config(int64_t B, int64_t L, int64_t H, int64_t G, int64_t N, int64_t P,
                             int64_t R, uint64_t seed);

struct StateBuffers {
  HostTensor angle, ssm, k, v;
  States view() const;
};

struct GradBuffers {
  HostTensor q, k, v, adt, dt, trap, q_bias, k_bias, angles, d, z, mimo_v, mimo_z, mimo_o,
      norm_weight;
  StateBuffers initial;
  Grads view() const;
};

class Problem {
 public:
  explicit Problem(const ProblemConfig& cfg);

  const ProblemConfig& config() const { return cfg_; }
  Inputs inputs() const;

  // Output buffer of the forward (shape (B,L,H,P) or (B,L,R,H,P)), zero-filled.
  HostTensor make_out(DType dtype) const;
  std::vector<int64_t> out_shape() const;
  // Final-state buffers (fp32), zero-filled.
  StateBuffers make_states() const;
  // Random cotangents for out and all four final states (fp32 states, out in `dtype`).
  HostTensor random_d_out(DType dtype, uint64_t seed) const;
  StateBuffers random_d_states(uint64_t seed) const;
  // Gradient buffers for every present input, zero-filled; float64 when `f64`, else each
  // gradient in its input's dtype.
  GradBuffers make_grads(bool f64) const;

  // Re-stores every float input in `dtype` (q, k, v, z, trap) rounded; other inputs unchanged.
  Problem rounded_to(DType dtype) const;
  // The same problem with every input converted to float64 (for the reference lane).
  Problem as_f64() const;
  // Tokens [l0, l1) of a problem without packed sequences (per-token inputs copied,
  // parameters and initial states kept).
  Problem tokens(int64_t l0, int64_t l1) const;

  HostTensor q, k, v, adt, dt, trap, q_bias, k_bias, angles, d, z, mimo_v, mimo_z, mimo_o,
      norm_weight, cu_seqlens;
  StateBuffers initial;  // all absent unless cfg.has_states

 private:
  Problem() = default;
  ProblemConfig cfg_;
};

}  // namespace mamba3::check
