#include "cli/util.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

namespace mamba3::cli {
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
  summarize(timing);
  return Status::Ok();
}

void summarize(Timing* timing) {
  std::vector<double> s = timing->samples_s;
  if (s.empty()) return;
  std::sort(s.begin(), s.end());
  const size_t n = s.size();
  timing->median_s = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
  timing->min_s = s.front();
}

double forward_flops(const check::ProblemConfig& c) {
  return 2.0 * static_cast<double>(c.B * c.L * c.H * c.R) *
         (64.0 * static_cast<double>(c.N + c.P) + 2.0 * static_cast<double>(c.N * c.P));
}

StepTokens step_tokens(const Problem& p, int64_t t) {
  StepTokens tok;
  tok.q = p.q.select(1, t);
  tok.k = p.k.select(1, t);
  tok.v = p.v.select(1, t);
  tok.z = p.z.select(1, t);
  tok.angles = p.angles.select(1, t);
  tok.adt = p.adt.select(2, t);
  tok.dt = p.dt.select(2, t);
  tok.trap = p.trap.select(2, t);
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
