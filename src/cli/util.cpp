#include "cli/util.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

namespace mamba3::cli {
namespace {

// Copies the first `len` entries along `axis` of a row-major tensor.
HostTensor slice_prefix(const HostTensor& t, size_t axis, int64_t len) {
  if (!t.defined()) return {};
  std::vector<int64_t> shape = t.shape();
  const int64_t full = shape[axis];
  shape[axis] = len;
  HostTensor out(t.dtype(), shape);
  int64_t outer = 1, inner = dtype_size(t.dtype());
  for (size_t d = 0; d < axis; ++d) outer *= shape[d];
  for (size_t d = axis + 1; d < shape.size(); ++d) inner *= shape[d];
  const auto* src = static_cast<const unsigned char*>(t.data());
  auto* dst = static_cast<unsigned char*>(out.data());
  for (int64_t o = 0; o < outer; ++o) {
    std::memcpy(dst + o * len * inner, src + o * full * inner, static_cast<size_t>(len * inner));
  }
  return out;
}

// Entry `index` of `axis`, with that axis removed.
HostTensor slice_at(const HostTensor& t, size_t axis, int64_t index) {
  if (!t.defined()) return {};
  std::vector<int64_t> shape = t.shape();
  const int64_t full = shape[axis];
  shape.erase(shape.begin() + static_cast<std::ptrdiff_t>(axis));
  HostTensor out(t.dtype(), shape);
  int64_t outer = 1, inner = dtype_size(t.dtype());
  for (size_t d = 0; d < axis; ++d) outer *= shape[d];
  for (size_t d = axis; d < shape.size(); ++d) inner *= shape[d];
  const auto* src = static_cast<const unsigned char*>(t.data());
  auto* dst = static_cast<unsigned char*>(out.data());
  for (int64_t o = 0; o < outer; ++o) {
    std::memcpy(dst + o * inner, src + (o * full + index) * inner, static_cast<size_t>(inner));
  }
  return out;
}

}  // namespace

Status time_runs(int warmup, int iters, const std::function<Status()>& fn, Timing* timing) {
  *timing = Timing{};
  for (int i = 0; i < warmup; ++i) {
    Status st = fn();
    if (!st.ok()) return st;
  }
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    Status st = fn();
    const auto t1 = std::chrono::steady_clock::now();
    if (!st.ok()) return st;
    timing->samples_s.push_back(std::chrono::duration<double>(t1 - t0).count());
  }
  if (timing->samples_s.empty()) return Status::InvalidArgument("no timed iterations (iters = 0)");
  std::vector<double> s = timing->samples_s;
  std::sort(s.begin(), s.end());
  const size_t n = s.size();
  timing->median_s = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
  timing->min_s = s.front();
  return Status::Ok();
}

double forward_flops(const check::ProblemConfig& c) {
  return 2.0 * static_cast<double>(c.B * c.L * c.H * c.R) *
         (64.0 * static_cast<double>(c.N + c.P) + 2.0 * static_cast<double>(c.N * c.P));
}

Problem prefix_of(const Problem& full, int64_t len) {
  check::ProblemConfig cfg = full.config();
  cfg.L = len;
  Problem p(cfg);  // right shapes; every tensor is overwritten below
  p.q = slice_prefix(full.q, 1, len);
  p.k = slice_prefix(full.k, 1, len);
  p.v = slice_prefix(full.v, 1, len);
  p.z = slice_prefix(full.z, 1, len);
  p.angles = slice_prefix(full.angles, 1, len);
  p.adt = slice_prefix(full.adt, 2, len);
  p.dt = slice_prefix(full.dt, 2, len);
  p.trap = slice_prefix(full.trap, 2, len);
  p.q_bias = full.q_bias, p.k_bias = full.k_bias, p.d = full.d;
  p.mimo_v = full.mimo_v, p.mimo_z = full.mimo_z, p.mimo_o = full.mimo_o;
  p.norm_weight = full.norm_weight;
  p.initial = full.initial;
  return p;
}

StepTokens step_tokens(const Problem& p, int64_t t) {
  StepTokens tok;
  tok.q = slice_at(p.q, 1, t);
  tok.k = slice_at(p.k, 1, t);
  tok.v = slice_at(p.v, 1, t);
  tok.z = slice_at(p.z, 1, t);
  tok.angles = slice_at(p.angles, 1, t);
  tok.adt = slice_at(p.adt, 2, t);
  tok.dt = slice_at(p.dt, 2, t);
  tok.trap = slice_at(p.trap, 2, t);
  return tok;
}

std::vector<int64_t> step_out_shape(const Problem& p) {
  std::vector<int64_t> shape = p.out_shape();
  shape.erase(shape.begin() + 1);
  return shape;
}

StepArgs step_args(const Problem& p, const StepTokens& tok, const States& state, const Tensor& out,
                   Lane lane) {
  StepArgs a;
  a.q = tok.q.view(), a.k = tok.k.view(), a.v = tok.v.view(), a.z = tok.z.view();
  a.adt = tok.adt.view(), a.dt = tok.dt.view(), a.trap = tok.trap.view();
  a.angles = tok.angles.view();
  a.q_bias = p.q_bias.view(), a.k_bias = p.k_bias.view(), a.d = p.d.view();
  a.mimo_v = p.mimo_v.view(), a.mimo_z = p.mimo_z.view(), a.mimo_o = p.mimo_o.view();
  a.norm_weight = p.norm_weight.view();
  a.state = state;
  a.out = out;
  a.rope_pairing = p.config().rope_pairing;
  a.lane = lane;
  return a;
}

StateBuffers states_as(const StateBuffers& s, DType dtype) {
  return {s.angle.to(dtype), s.ssm.to(dtype), s.k.to(dtype), s.v.to(dtype)};
}

std::vector<std::pair<std::string, const HostTensor*>> state_list(const StateBuffers& s,
                                                                  const std::string& prefix) {
  std::vector<std::pair<std::string, const HostTensor*>> out;
  for (auto [name, t] : {std::pair{"state_angle", &s.angle},
                         {"state_ssm", &s.ssm},
                         {"state_k", &s.k},
                         {"state_v", &s.v}}) {
    if (t->defined()) out.emplace_back(prefix + name, t);
  }
  return out;
}

std::vector<std::pair<std::string, const HostTensor*>> grad_list(const GradBuffers& g) {
  std::vector<std::pair<std::string, const HostTensor*>> out;
  for (auto [name, t] : {std::pair{"q", &g.q},
                         {"k", &g.k},
                         {"v", &g.v},
                         {"adt", &g.adt},
                         {"dt", &g.dt},
                         {"trap", &g.trap},
                         {"q_bias", &g.q_bias},
                         {"k_bias", &g.k_bias},
                         {"angles", &g.angles},
                         {"d", &g.d},
                         {"z", &g.z},
                         {"mimo_v", &g.mimo_v},
                         {"mimo_z", &g.mimo_z},
                         {"mimo_o", &g.mimo_o},
                         {"norm_weight", &g.norm_weight},
                         {"initial.angle", &g.initial.angle},
                         {"initial.ssm", &g.initial.ssm},
                         {"initial.k", &g.initial.k},
                         {"initial.v", &g.initial.v}}) {
    if (t->defined()) out.emplace_back(std::string("grad.") + name, t);
  }
  return out;
}

std::string format_seconds(double s) {
  if (s >= 1.0) return fmt::format("{:.3f} s", s);
  if (s >= 1e-3) return fmt::format("{:.3f} ms", s * 1e3);
  return fmt::format("{:.2f} us", s * 1e6);
}

std::string format_rate(double per_s) {
  if (per_s >= 1e9) return fmt::format("{:.2f} G", per_s * 1e-9);
  if (per_s >= 1e6) return fmt::format("{:.2f} M", per_s * 1e-6);
  if (per_s >= 1e3) return fmt::format("{:.2f} k", per_s * 1e-3);
  return fmt::format("{:.2f} ", per_s);
}

}  // namespace mamba3::cli
