#include "check/problem.h"

#include <cmath>
#include <sstream>

namespace mamba3::check {
namespace {

// splitmix64 + Box-Muller: identical draws on every platform and standard library.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * 0x1.0p-53; }
  double normal() {
    double u1 = uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
  }

 private:
  uint64_t s_;
};

HostTensor filled(DType dtype, std::vector<int64_t> shape, Rng& rng, double scale,
                  double shift = 0.0) {
  HostTensor t(dtype, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, shift + scale * rng.normal());
  return t;
}

// RMS-normalize consecutive groups of n elements (q and k arrive RMS-normed from the module).
void rms_normalize(HostTensor& t, int64_t n) {
  for (int64_t base = 0; base < t.numel(); base += n) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += t.get(base + i) * t.get(base + i);
    double r = 1.0 / std::sqrt(ss / static_cast<double>(n) + 1e-5);
    for (int64_t i = 0; i < n; ++i) t.set(base + i, t.get(base + i) * r);
  }
}

}  // namespace

std::string ProblemConfig::describe() const {
  std::ostringstream os;
  os << "B=" << B << " L=" << L << " H=" << H << " G=" << G << " N=" << N << " P=" << P
     << " R=" << R << " NA=" << NA << " " << dtype_name(dtype)
     << (rope_pairing == RopePairing::kHalved ? " halved" : " interleaved");
  if (has_states) os << " states";
  if (!seqlens.empty()) os << " varlen(S=" << seqlens.size() << ")";
  if (R > 1 && has_mimo_o) os << " mimo_o";
  if (has_norm) os << " norm";
  return os.str();
}

ProblemConfig default_config(int64_t B, int64_t L, int64_t H, int64_t G, int64_t N, int64_t P,
                             int64_t R, uint64_t seed) {
  ProblemConfig c;
  c.B = B, c.L = L, c.H = H, c.G = G, c.N = N, c.P = P, c.R = R, c.NA = N / 4;
  c.seed = seed;
  c.siso_layout = R == 1;
  c.has_mimo_v = c.has_mimo_z = c.has_mimo_o = R > 1;
  c.rope_pairing = R > 1 ? RopePairing::kHalved : RopePairing::kInterleaved;
  return c;
}

States StateBuffers::view() const { return {angle.view(), ssm.view(), k.view(), v.view()}; }

Grads GradBuffers::view() const {
  Grads g;
  g.q = q.view(), g.k = k.view(), g.v = v.view(), g.adt = adt.view(), g.dt = dt.view();
  g.trap = trap.view(), g.q_bias = q_bias.view(), g.k_bias = k_bias.view();
  g.angles = angles.view(), g.d = d.view(), g.z = z.view(), g.mimo_v = mimo_v.view();
  g.mimo_z = mimo_z.view(), g.mimo_o = mimo_o.view(), g.norm_weight = norm_weight.view();
  g.initial = initial.view();
  return g;
}

Problem::Problem(const ProblemConfig& cfg) : cfg_(cfg) {
  Rng rng(cfg.seed);
  const auto& c = cfg;
  const DType dt16 = c.dtype;
  const bool siso = c.siso_layout && c.R == 1;
  std::vector<int64_t> qk_shape =
      siso ? std::vector<int64_t>{c.B, c.L, c.G, c.N} : std::vector<int64_t>{c.B, c.L, c.R, c.G, c.N};
  std::vector<int64_t> bias_shape =
      siso ? std::vector<int64_t>{c.H, c.N} : std::vector<int64_t>{c.H, c.R, c.N};

  // Draw in float64, normalize, then store in the problem dtype.
  HostTensor q64 = filled(DType::kF64, qk_shape, rng, 1.0);
  HostTensor k64 = filled(DType::kF64, qk_shape, rng, 1.0);
  rms_normalize(q64, c.N);
  rms_normalize(k64, c.N);
  q = q64.to(dt16);
  k = k64.to(dt16);
  v = filled(dt16, {c.B, c.L, c.H, c.P}, rng, 1.0);

  // dt log-uniform in [1e-3, 1e-1], A = -exp(U[log 1, log 16]) per head (Mamba init ranges).
  dt = HostTensor(DType::kF32, {c.B, c.H, c.L});
  adt = HostTensor(DType::kF32, {c.B, c.H, c.L});
  std::vector<double> a_head(static_cast<size_t>(c.H));
  for (auto& a : a_head) a = -std::exp(rng.uniform() * std::log(16.0));
  for (int64_t i = 0; i < dt.numel(); ++i) {
    double d = std::exp(std::log(1e-3) + rng.uniform() * (std::log(1e-1) - std::log(1e-3)));
    dt.set(i, d);
    int64_t h = (i / c.L) % c.H;
    adt.set(i, a_head[static_cast<size_t>(h)] * dt.get(i));
  }
  trap = filled(dt16, {c.B, c.H, c.L}, rng, 1.0);
  q_bias = filled(DType::kF32, bias_shape, rng, 0.1, 1.0);
  k_bias = filled(DType::kF32, bias_shape, rng, 0.1, 1.0);
  angles = filled(DType::kF32, {c.B, c.L, c.H, c.NA}, rng, 1.0);
  if (c.has_d) d = filled(DType::kF32, {c.H}, rng, 1.0);
  if (c.has_z) z = filled(dt16, {c.B, c.L, c.H, c.P}, rng, 1.0);
  const double inv_r = 1.0 / static_cast<double>(c.R);
  if (c.has_mimo_v) mimo_v = filled(DType::kF32, {c.H, c.R, c.P}, rng, 0.2 * inv_r, inv_r);
  if (c.has_mimo_z) mimo_z = filled(DType::kF32, {c.H, c.R, c.P}, rng, 0.2, 1.0);
  if (c.has_mimo_o) mimo_o = filled(DType::kF32, {c.H, c.R, c.P}, rng, 0.2 * inv_r, inv_r);
  if (c.has_norm) norm_weight = filled(DType::kF32, {c.H, c.P}, rng, 0.1, 1.0);

  const int64_t S = c.S();
  if (c.has_states) {
    initial.angle = HostTensor(DType::kF32, {S, c.H, c.NA});
    for (int64_t i = 0; i < initial.angle.numel(); ++i)
      initial.angle.set(i, 2.0 * M_PI * rng.uniform());
    initial.ssm = filled(DType::kF32, {S, c.H, c.P, c.N}, rng, 0.5);
    initial.k = filled(DType::kF32,
                       siso ? std::vector<int64_t>{S, c.H, c.N}
                            : std::vector<int64_t>{S, c.R, c.H, c.N},
                       rng, 1.0);
    initial.v = filled(DType::kF32, {S, c.H, c.P}, rng, 1.0);
  }
  if (!c.seqlens.empty()) {
    cu_seqlens = HostTensor(DType::kI32, {S + 1});
    int64_t acc = 0;
    for (int64_t s = 0; s < S; ++s) {
      cu_seqlens.set(s, static_cast<double>(acc));
      acc += c.seqlens[static_cast<size_t>(s)];
    }
    cu_seqlens.set(S, static_cast<double>(acc));
  }
}

Inputs Problem::inputs() const {
  Inputs in;
  in.q = q.view(), in.k = k.view(), in.v = v.view(), in.adt = adt.view(), in.dt = dt.view();
  in.trap = trap.view(), in.q_bias = q_bias.view(), in.k_bias = k_bias.view();
  in.angles = angles.view(), in.d = d.view(), in.z = z.view(), in.mimo_v = mimo_v.view();
  in.mimo_z = mimo_z.view(), in.mimo_o = mimo_o.view(), in.norm_weight = norm_weight.view();
  in.initial = initial.view();
  in.cu_seqlens = cu_seqlens.view();
  in.rope_pairing = cfg_.rope_pairing;
  return in;
}

std::vector<int64_t> Problem::out_shape() const {
  // L from v, so a problem sliced along time (tests) gets matching buffers.
  const auto& c = cfg_;
  const int64_t L = v.shape()[1];
  if (c.R > 1 && !c.has_mimo_o) return {c.B, L, c.R, c.H, c.P};
  return {c.B, L, c.H, c.P};
}

HostTensor Problem::make_out(DType dtype) const { return HostTensor(dtype, out_shape()); }

StateBuffers Problem::make_states() const {
  const auto& c = cfg_;
  const int64_t S = c.S();
  const bool siso = c.siso_layout && c.R == 1;
  StateBuffers s;
  s.angle = HostTensor(DType::kF32, {S, c.H, c.NA});
  s.ssm = HostTensor(DType::kF32, {S, c.H, c.P, c.N});
  s.k = HostTensor(DType::kF32, siso ? std::vector<int64_t>{S, c.H, c.N}
                                     : std::vector<int64_t>{S, c.R, c.H, c.N});
  s.v = HostTensor(DType::kF32, {S, c.H, c.P});
  return s;
}

HostTensor Problem::random_d_out(DType dtype, uint64_t seed) const {
  Rng rng(seed ^ 0xD0u);
  return filled(dtype, out_shape(), rng, 1.0);
}

StateBuffers Problem::random_d_states(uint64_t seed) const {
  Rng rng(seed ^ 0xD5u);
  StateBuffers s = make_states();
  for (HostTensor* t : {&s.angle, &s.ssm, &s.k, &s.v})
    for (int64_t i = 0; i < t->numel(); ++i) t->set(i, rng.normal());
  return s;
}

GradBuffers Problem::make_grads(bool f64) const {
  auto like = [f64](const HostTensor& t) {
    return t.defined() ? HostTensor(f64 ? DType::kF64 : t.dtype(), t.shape()) : HostTensor{};
  };
  GradBuffers g;
  g.q = like(q), g.k = like(k), g.v = like(v), g.adt = like(adt), g.dt = like(dt);
  g.trap = like(trap), g.q_bias = like(q_bias), g.k_bias = like(k_bias);
  g.angles = like(angles), g.d = like(d), g.z = like(z), g.mimo_v = like(mimo_v);
  g.mimo_z = like(mimo_z), g.mimo_o = like(mimo_o), g.norm_weight = like(norm_weight);
  g.initial.angle = like(initial.angle), g.initial.ssm = like(initial.ssm);
  g.initial.k = like(initial.k), g.initial.v = like(initial.v);
  return g;
}

Problem Problem::rounded_to(DType dtype) const {
  Problem p = *this;
  p.cfg_.dtype = dtype;
  for (HostTensor* t : {&p.q, &p.k, &p.v, &p.z, &p.trap})
    if (t->defined()) *t = t->to(dtype);
  return p;
}

Problem Problem::as_f64() const {
  Problem p = *this;
  for (HostTensor* t : {&p.q, &p.k, &p.v, &p.adt, &p.dt, &p.trap, &p.q_bias, &p.k_bias,
                        &p.angles, &p.d, &p.z, &p.mimo_v, &p.mimo_z, &p.mimo_o, &p.norm_weight,
                        &p.initial.angle, &p.initial.ssm, &p.initial.k, &p.initial.v})
    if (t->defined()) *t = t->to(DType::kF64);
  return p;
}

Problem Problem::tokens(int64_t l0, int64_t l1) const {
  Problem p = *this;
  p.cfg_.L = l1 - l0;
  for (HostTensor* t : {&p.q, &p.k, &p.v, &p.z, &p.angles}) *t = t->slice(1, l0, l1);
  for (HostTensor* t : {&p.adt, &p.dt, &p.trap}) *t = t->slice(2, l0, l1);
  return p;
}

}  // namespace mamba3::check
