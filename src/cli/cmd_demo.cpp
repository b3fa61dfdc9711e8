// mamba3 demo: the main job on a built-in problem. A SISO and a MIMO layer: timed forward (with
// final states), backward (cotangents for out and every final state) and a decode stream from
// the final states; then the fast lane against the float64 reference on a 256-token prefix.
#include <fmt/core.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "check/compare.h"
#include "cli/commands.h"
#include "cli/util.h"
#include "reference/reference.h"

namespace mamba3::cli {
namespace {

constexpr int64_t kL = 2048;        // tokens per timed layer call
constexpr int kDecodeSteps = 128;   // timed decode stream
constexpr int64_t kCheckLen = 256;  // correctness prefix
constexpr int kCheckSteps = 16;     // decode steps checked after the prefix
constexpr int kTotalPhases = 8;

struct Layer {
  std::string name;
  check::ProblemConfig cfg;
};

struct TimingRow {
  std::string layer, op;
  Timing timing;
  double tokens;  // tokens processed per timed run
};

int phase = 0;
void progress(const std::string& what) {
  fmt::print(stderr, "[{}/{}] {} ...\n", ++phase, kTotalPhases, what);
}

// ---------------------------------------------------------------------------------------------
// Timed runs on the full layer

Status time_layer(const Layer& layer, Lane lane, std::vector<TimingRow>* rows) {
  const Problem p(layer.cfg);
  const int64_t tokens = layer.cfg.B * layer.cfg.L;

  progress(layer.name + " forward");
  HostTensor out = p.make_out(DType::kF32);
  StateBuffers fin = p.make_states();
  ForwardArgs fwd;
  fwd.in = p.inputs();
  fwd.out = out.view();
  fwd.final_states = fin.view();
  fwd.lane = lane;
  TimingRow row{layer.name, "forward", {}, static_cast<double>(tokens)};
  Status st = time_runs(
      1, 3, [&] { return forward(fwd); }, &row.timing);
  if (!st.ok()) return st;
  rows->push_back(row);

  progress(layer.name + " backward");
  HostTensor d_out = p.random_d_out(DType::kF32, /*seed=*/21);
  StateBuffers d_states = p.random_d_states(/*seed=*/22);
  GradBuffers grads = p.make_grads(/*f64=*/false);
  BackwardArgs bwd;
  bwd.in = p.inputs();
  bwd.d_out = d_out.view();
  bwd.d_final = d_states.view();
  bwd.grads = grads.view();
  bwd.lane = lane;
  row = {layer.name, "backward", {}, static_cast<double>(tokens)};
  st = time_runs(
      1, 3, [&] { return backward(bwd); }, &row.timing);
  if (!st.ok()) return st;
  rows->push_back(row);

  progress(layer.name + " decode (" + std::to_string(kDecodeSteps) + " steps)");
  check::ProblemConfig dec_cfg = layer.cfg;
  dec_cfg.L = kDecodeSteps;
  dec_cfg.seed += 1000;
  const Problem dec(dec_cfg);
  std::vector<StepTokens> toks;
  for (int64_t t = 0; t < kDecodeSteps; ++t) toks.push_back(step_tokens(dec, t));
  HostTensor step_out(DType::kF32, step_out_shape(dec));
  // Warm up on a scratch copy, then time the stream continuing from the forward's final states.
  StateBuffers scratch = fin, state = fin;
  auto stream = [&](StateBuffers& s) {
    for (const StepTokens& tok : toks) {
      Status r = step(step_args(dec, tok, s.view(), step_out.view(), lane));
      if (!r.ok()) return r;
    }
    return Status::Ok();
  };
  row = {layer.name, "decode step", {}, static_cast<double>(layer.cfg.B * kDecodeSteps)};
  if (st = stream(scratch); !st.ok()) return st;
  st = time_runs(
      0, 1, [&] { return stream(state); }, &row.timing);
  if (!st.ok()) return st;
  rows->push_back(row);
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// Correctness on a prefix: the lane and the naive float32 evaluation against float64.

enum class Mode { kReference, kNaiveF32, kLane };

struct Evaluation {
  HostTensor out;
  StateBuffers fin;
  GradBuffers grads;
  std::vector<double> step_out;  // every decode step's output, concatenated
  StateBuffers step_state;       // after the decode steps
};

Status evaluate(const Problem& pre, const Problem& full, Mode mode, Lane lane,
                const HostTensor& d_out, const StateBuffers& d_states, Evaluation* e) {
  const DType fdt = mode == Mode::kReference ? DType::kF64 : DType::kF32;
  const Lane call_lane = mode == Mode::kLane ? lane : Lane::kReference;
  const bool naive = mode == Mode::kNaiveF32;

  e->out = pre.make_out(fdt);
  e->fin = states_as(pre.make_states(), fdt);
  ForwardArgs fwd;
  fwd.in = pre.inputs();
  fwd.out = e->out.view();
  fwd.final_states = e->fin.view();
  fwd.lane = call_lane;
  Status st = naive ? validate(fwd) : Status::Ok();
  if (st.ok()) st = naive ? reference::forward<float>(fwd) : forward(fwd);
  if (!st.ok()) return st;

  const HostTensor d_out_f = d_out.to(fdt);
  const StateBuffers d_states_f = states_as(d_states, fdt);
  e->grads = pre.make_grads(fdt == DType::kF64);
  BackwardArgs bwd;
  bwd.in = pre.inputs();
  bwd.d_out = d_out_f.view();
  bwd.d_final = d_states_f.view();
  bwd.grads = e->grads.view();
  bwd.lane = call_lane;
  st = naive ? validate(bwd) : Status::Ok();
  if (st.ok()) st = naive ? reference::backward<float>(bwd) : backward(bwd);
  if (!st.ok()) return st;

  e->step_state = e->fin;
  HostTensor out(fdt, step_out_shape(pre));
  for (int i = 0; i < kCheckSteps; ++i) {
    const StepTokens tok = step_tokens(full, kCheckLen + i);
    const StepArgs args = step_args(pre, tok, e->step_state.view(), out.view(), call_lane);
    st = naive ? validate(args) : Status::Ok();
    if (st.ok()) st = naive ? reference::step<float>(args) : step(args);
    if (!st.ok()) return st;
    const std::vector<double> o = out.to_double();
    e->step_out.insert(e->step_out.end(), o.begin(), o.end());
  }
  return Status::Ok();
}

// (name, values, circular) of everything an evaluation produced, in a fixed order.
struct Quantity {
  std::string name;
  std::vector<double> values;
  bool circular;
};
std::vector<Quantity> quantities(const Evaluation& e) {
  std::vector<Quantity> q = {{"out", e.out.to_double(), false}};
  for (const auto& [name, t] : state_list(e.fin, "final.")) {
    q.push_back({name, t->to_double(), name == "final.state_angle"});
  }
  for (const auto& [name, t] : grad_list(e.grads)) q.push_back({name, t->to_double(), false});
  q.push_back({"decode.out", e.step_out, false});
  for (const auto& [name, t] : state_list(e.step_state, "decode.")) {
    q.push_back({name, t->to_double(), name == "decode.state_angle"});
  }
  return q;
}

Status check_layer(const Layer& layer, Lane lane, std::vector<check::Metric>* metrics) {
  progress(layer.name + " correctness (first " + std::to_string(kCheckLen) + " tokens + " +
           std::to_string(kCheckSteps) + " decode steps vs float64 reference)");
  // The same seed gives the same full problem; its prefix is what the timed layer saw first.
  const Problem full(layer.cfg);
  const Problem pre = full.tokens(0, kCheckLen);
  const HostTensor d_out = pre.random_d_out(DType::kF32, /*seed=*/31);
  const StateBuffers d_states = pre.random_d_states(/*seed=*/32);

  Evaluation ref, naive, got;
  Status st = evaluate(pre, full, Mode::kReference, lane, d_out, d_states, &ref);
  if (!st.ok()) return Status(st.code(), "reference lane: " + st.message());
  st = evaluate(pre, full, Mode::kNaiveF32, lane, d_out, d_states, &naive);
  if (!st.ok()) return Status(st.code(), "naive float32 evaluation: " + st.message());
  st = evaluate(pre, full, Mode::kLane, lane, d_out, d_states, &got);
  if (!st.ok()) return Status(st.code(), std::string(lane_name(lane)) + " lane: " + st.message());

  const std::vector<Quantity> r = quantities(ref), n = quantities(naive), g = quantities(got);
  for (size_t i = 0; i < r.size(); ++i) {
    const double err_naive =
        check::compare(r[i].name, n[i].values, r[i].values, 0, r[i].circular).rel_l2;
    metrics->push_back(check::compare(layer.name + " " + r[i].name, g[i].values, r[i].values,
                                      check::tolerance_from_naive(err_naive), r[i].circular));
  }
  return Status::Ok();
}

}  // namespace

int run_demo() {
  // The CUDA lane has no kernels yet (lanes() says why); the demo runs the cpu lane.
  const Lane lane = Lane::kCpu;
  check::ProblemConfig siso = check::default_config(1, kL, 8, 1, 128, 64, 1, /*seed=*/1);
  check::ProblemConfig mimo = check::default_config(1, kL, 8, 1, 128, 64, 4, /*seed=*/2);
  siso.NA = mimo.NA = 32;
  const std::vector<Layer> layers = {{"SISO", siso}, {"MIMO", mimo}};

  fmt::print("mamba3 {} demo on the {} lane\n", version(), lane_name(lane));
  for (const LaneInfo& info : lanes()) {
    fmt::print("  lane {:<10} {}\n", info.name, info.available ? "available" : info.detail);
  }
  for (const Layer& l : layers) fmt::print("  {}: {}\n", l.name, l.cfg.describe());

  std::vector<TimingRow> rows;
  for (const Layer& l : layers) {
    if (Status st = time_layer(l, lane, &rows); !st.ok()) {
      fmt::print(stderr, "mamba3 demo: {} on the {} lane: {}\n", l.name, lane_name(lane),
                 st.ToString());
      return 1;
    }
  }
  std::vector<check::Metric> metrics;
  for (const Layer& l : layers) {
    if (Status st = check_layer(l, lane, &metrics); !st.ok()) {
      fmt::print(stderr, "mamba3 demo: {} correctness: {}\n", l.name, st.ToString());
      return 1;
    }
  }

  fmt::print(
      "\nTiming ({} lane; forward/backward: median of 3 after 1 warm-up, L={}; decode: "
      "a stream of {} steps from the forward's final states)\n",
      lane_name(lane), kL, kDecodeSteps);
  fmt::print("  {:<6} {:<12} {:>12} {:>14} {:>14}\n", "layer", "op", "median", "per token",
             "tokens/s");
  for (const TimingRow& r : rows) {
    fmt::print("  {:<6} {:<12} {:>12} {:>14} {:>14}\n", r.layer, r.op,
               format_seconds(r.timing.median_s), format_seconds(r.timing.median_s / r.tokens),
               format_rate(r.tokens / r.timing.median_s));
  }

  fmt::print(
      "\nCorrectness: {} lane vs float64 reference on the first {} tokens and {} decode "
      "steps\n(tolerance = 2 x error of a naive float32 evaluation + {:g})\n",
      lane_name(lane), kCheckLen, kCheckSteps, check::kToleranceFloor);
  fmt::print("{}\n", check::format_metric_header());
  int failed = 0;
  for (const check::Metric& m : metrics) {
    fmt::print("{}\n", check::format_metric(m));
    failed += !m.pass;
  }
  fmt::print("\n{} passed, {} failed\n", static_cast<int>(metrics.size()) - failed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace mamba3::cli
