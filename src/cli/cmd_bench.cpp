// mamba3 bench: forward, backward and decode-step timings of one shape on one lane, with the
// same run's fp32 matrix-multiply rate as the compute ceiling.
#include <fmt/core.h>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/commands.h"
#include "cli/util.h"
#include "core/build_commit.h"
#include "cpu/cpu_lane.h"
#include "cuda/cuda_lane.h"

namespace mamba3::cli {
namespace {

// Standard shapes (B, L, H, G, N, P, default R); DESIGN.md §6 plus two CPU-sized ones.
struct NamedShape {
  int64_t B, L, H, G, N, P, R;
};
const std::map<std::string, NamedShape>& named_shapes() {
  static const std::map<std::string, NamedShape> kShapes = {
      {"cpu", {1, 4096, 8, 1, 128, 64, 1}},    {"cpu-mimo", {1, 4096, 8, 1, 128, 64, 4}},
      {"train", {4, 4096, 64, 1, 128, 64, 1}}, {"long", {1, 65536, 64, 1, 128, 64, 1}},
      {"wide", {8, 8192, 32, 1, 128, 64, 1}},  {"megacpp", {8, 8192, 16, 1, 64, 64, 4}},
  };
  return kShapes;
}

constexpr int kStepStream = 64;  // decode steps per timed run

// Bytes a forward must move at least: every input read once, every output written once.
double forward_min_bytes(const Problem& p) {
  double bytes = 0;
  for (const HostTensor* t : {&p.q, &p.k, &p.v, &p.adt, &p.dt, &p.trap, &p.q_bias, &p.k_bias,
                              &p.angles, &p.d, &p.z, &p.mimo_v, &p.mimo_z, &p.mimo_o,
                              &p.norm_weight, &p.initial.angle, &p.initial.ssm, &p.initial.k,
                              &p.initial.v})
    if (t->defined()) bytes += static_cast<double>(t->numel() * dtype_size(t->dtype()));
  HostTensor out = p.make_out(p.config().dtype);
  bytes += static_cast<double>(out.numel() * dtype_size(out.dtype()));
  check::StateBuffers fs = p.make_states();
  for (const HostTensor* t : {&fs.angle, &fs.ssm, &fs.k, &fs.v})
    bytes += static_cast<double>(t->numel() * dtype_size(t->dtype()));
  return bytes;
}

struct OpResult {
  std::string op;
  Timing timing;
  double tokens_per_s = 0;
  double gflops = 0;  // 0: not applicable
};

// A saved-activation buffer for `args` (training mode), or an absent one.
Status attach_saved(const BenchOptions& o, ForwardArgs* args, HostTensor* saved) {
  if (!o.use_saved) return Status::Ok();
  int64_t n = 0;
  // The cuda lane runs host-staged here: its size is that of the staged copies.
  Status st = args->lane == Lane::kCuda ? cuda::saved_numel_staged(*args, &n) : saved_numel(*args, &n);
  if (!st.ok()) return st;
  if (n == 0) return Status::Ok();
  *saved = HostTensor(DType::kF32, {n});
  args->saved = saved->view();
  return Status::Ok();
}

Status bench_forward(const Problem& p, Lane lane, const BenchOptions& o, OpResult* r) {
  HostTensor out = p.make_out(p.config().dtype), saved;
  check::StateBuffers final_states = p.make_states();
  ForwardArgs args;
  args.in = p.inputs();
  args.out = out.view();
  args.final_states = final_states.view();
  args.lane = lane;
  args.num_threads = o.threads;
  r->op = "fwd";
  Status st;
  if (lane == Lane::kCuda) {
    // Device buffers staged once; CUDA events around each call. Training mode: the forward
    // also writes the saved activations (the tensor-core path's tile records).
    if (st = attach_saved(o, &args, &saved); !st.ok()) return st;
    st = cuda::time_forward_staged(args, o.warmup, o.iters, &r->timing.samples_s);
    if (st.ok()) summarize(&r->timing);
  } else {
    if (st = attach_saved(o, &args, &saved); !st.ok()) return st;
    st = time_runs(o.warmup, o.iters, [&] { return forward(args); }, &r->timing);
  }
  if (!st.ok()) return st;
  const auto& c = p.config();
  r->tokens_per_s = static_cast<double>(c.B * c.L) / r->timing.median_s;
  r->gflops = forward_flops(c) / r->timing.median_s * 1e-9;
  return Status::Ok();
}

Status bench_backward(const Problem& p, Lane lane, const BenchOptions& o, OpResult* r) {
  HostTensor d_out = p.random_d_out(p.config().dtype, /*seed=*/11);
  check::StateBuffers d_final = p.random_d_states(/*seed=*/12);
  check::GradBuffers grads = p.make_grads(/*f64=*/false);
  BackwardArgs args;
  args.in = p.inputs();
  args.d_out = d_out.view();
  args.d_final = d_final.view();
  args.grads = grads.view();
  args.lane = lane;
  args.num_threads = o.threads;
  const auto& c = p.config();
  if (lane == Lane::kCuda) {
    // Device buffers staged once; CUDA events around each call. Training mode: one forward
    // fills the saved activations (copied back to the host, then staged with the backward's
    // inputs); without them (--recompute, or off the tensor-core path) the backward recomputes.
    HostTensor out = p.make_out(p.config().dtype), saved;
    ForwardArgs fwd;
    fwd.in = args.in;
    fwd.out = out.view();
    fwd.lane = lane;
    if (Status st = attach_saved(o, &fwd, &saved); !st.ok()) return st;
    if (fwd.saved.defined()) {
      if (Status st = cuda::forward_staged(fwd); !st.ok()) return st;
      args.saved = fwd.saved;
    }
    r->op = args.saved.defined() ? "bwd" : "bwd-recompute";
    Status st = cuda::time_backward_staged(args, o.warmup, o.iters, &r->timing.samples_s);
    if (!st.ok()) return st;
    summarize(&r->timing);
    r->tokens_per_s = static_cast<double>(c.B * c.L) / r->timing.median_s;
    r->gflops = 3.0 * forward_flops(c) / r->timing.median_s * 1e-9;
    return Status::Ok();
  }
  // Training mode: one forward fills the saved activations the timed backwards read.
  HostTensor out = p.make_out(p.config().dtype), saved;
  ForwardArgs fwd;
  fwd.in = args.in;
  fwd.out = out.view();
  fwd.lane = lane;
  fwd.num_threads = o.threads;
  if (Status st = attach_saved(o, &fwd, &saved); !st.ok()) return st;
  if (fwd.saved.defined()) {
    if (Status st = forward(fwd); !st.ok()) return st;
    args.saved = fwd.saved;
  }
  r->op = o.use_saved ? "bwd" : "bwd-recompute";
  Status st = time_runs(
      o.warmup, o.iters, [&] { return backward(args); }, &r->timing);
  if (!st.ok()) return st;
  r->tokens_per_s = static_cast<double>(c.B * c.L) / r->timing.median_s;
  r->gflops = 3.0 * forward_flops(c) / r->timing.median_s * 1e-9;
  return Status::Ok();
}

// A stream of kStepStream decode steps, states updated in place; times are per step.
Status bench_step(const check::ProblemConfig& cfg, Lane lane, const BenchOptions& o, OpResult* r) {
  check::ProblemConfig step_cfg = cfg;
  step_cfg.L = kStepStream;
  step_cfg.seed = cfg.seed + 1;
  const Problem p(step_cfg);
  std::vector<StepTokens> tokens;
  for (int64_t t = 0; t < kStepStream; ++t) tokens.push_back(step_tokens(p, t));
  check::StateBuffers state = p.make_states();
  HostTensor out(cfg.dtype, step_out_shape(p));
  std::vector<StepArgs> args;
  for (const StepTokens& tok : tokens) {
    args.push_back(step_args(p, tok, state.view(), out.view(), lane));
  }
  r->op = "step";
  if (lane == Lane::kCuda) {
    // One CUDA graph of kStepStream steps of the first token's inputs, replayed.
    Status st = cuda::time_step_staged(args[0], o.warmup, o.iters, kStepStream, /*graph=*/true,
                                       &r->timing.samples_s);
    if (!st.ok()) return st;
    summarize(&r->timing);
    r->tokens_per_s = static_cast<double>(cfg.B) / r->timing.median_s;
    return Status::Ok();
  }
  Status st = time_runs(
      o.warmup, o.iters,
      [&] {
        for (const StepArgs& a : args) {
          Status s = step(a);
          if (!s.ok()) return s;
        }
        return Status::Ok();
      },
      &r->timing);
  if (!st.ok()) return st;
  for (double& s : r->timing.samples_s) s /= kStepStream;
  r->timing.median_s /= kStepStream;
  r->timing.min_s /= kStepStream;
  r->tokens_per_s = static_cast<double>(cfg.B) / r->timing.median_s;
  return Status::Ok();
}

Status parse_what(const std::string& what, std::vector<std::string>* ops) {
  std::stringstream ss(what);
  for (std::string op; std::getline(ss, op, ',');) {
    if (op != "fwd" && op != "bwd" && op != "step") {
      return Status::InvalidArgument("--what: unknown op '" + op + "' (fwd, bwd, step)");
    }
    ops->push_back(op);
  }
  if (ops->empty()) return Status::InvalidArgument("--what: no op given");
  return Status::Ok();
}

}  // namespace

int run_bench(const BenchOptions& o) {
  const auto fail = [](const std::string& msg) {
    fmt::print(stderr, "mamba3 bench: {}\n", msg);
    return 1;
  };
  // With --json - the JSON owns stdout and the human-readable report goes to stderr.
  FILE* rep = o.json == "-" ? stderr : stdout;
  std::vector<std::string> ops;
  if (Status st = parse_what(o.what, &ops); !st.ok()) return fail(st.ToString());

  NamedShape s = named_shapes().at(o.shape);
  if (o.rank > 0) s.R = o.rank;
  std::string shape_label = o.shape;
  for (auto [value, field] : {std::pair{o.B, &s.B},
                              {o.L, &s.L},
                              {o.H, &s.H},
                              {o.G, &s.G},
                              {o.N, &s.N},
                              {o.P, &s.P},
                              {o.R, &s.R}}) {
    if (value < 0) continue;
    *field = value;
    shape_label = o.shape + " with overrides";
  }
  check::ProblemConfig cfg = check::default_config(s.B, s.L, s.H, s.G, s.N, s.P, s.R, /*seed=*/1);
  cfg.dtype = o.dtype == "bf16" ? DType::kBF16 : DType::kF32;
  const Lane lane = o.lane == "reference" ? Lane::kReference
                    : o.lane == "cuda"    ? Lane::kCuda
                                          : Lane::kCpu;

  fmt::print(rep,
             "mamba3 bench: shape {} ({}), lane {}, {} warm-up + {} timed runs, threads {}, "
             "commit {}\n",
             shape_label, cfg.describe(), o.lane, o.warmup, o.iters,
             o.threads == 0 ? std::string("all") : std::to_string(o.threads), build_commit());
  fmt::print(stderr, "[bench] generating inputs ...\n");
  const Problem problem(cfg);

  std::vector<OpResult> results;
  for (const std::string& op : ops) {
    fmt::print(stderr, "[bench] {} ...\n", op);
    OpResult r;
    Status st = op == "fwd"   ? bench_forward(problem, lane, o, &r)
                : op == "bwd" ? bench_backward(problem, lane, o, &r)
                              : bench_step(cfg, lane, o, &r);
    if (st.code() == StatusCode::kNotSupported) {
      fmt::print(rep, "  {}: not run ({})\n", op, st.ToString());
      continue;
    }
    if (!st.ok()) return fail(op + ": " + st.ToString());
    results.push_back(r);
  }

  // The ceiling: fp32 GEMM of the matrix library the cpu lane uses, in this run.
  double sgemm = 0;
  if (lane != Lane::kCuda) {
    fmt::print(stderr, "[bench] fp32 matrix-multiply rate (n=1024, >= 1 s) ...\n");
    sgemm = cpu::measure_sgemm_gflops(1024, o.threads, 1.0);
  }

  fmt::print(rep, "\n  {:<13} {:>12} {:>12} {:>14} {:>10}\n", "op", "median", "min", "tokens/s",
             "GFLOP/s");
  const OpResult* fwd = nullptr;
  const OpResult* bwd = nullptr;
  for (const OpResult& r : results) {
    const std::string unit = r.op == "step" ? "/tok" : "";
    fmt::print(rep, "  {:<13} {:>12} {:>12} {:>14} {:>10}\n", r.op,
               format_seconds(r.timing.median_s) + unit, format_seconds(r.timing.min_s) + unit,
               format_rate(r.tokens_per_s),
               r.gflops > 0 ? fmt::format("{:.1f}", r.gflops) : std::string("-"));
    if (r.op == "fwd") fwd = &r;
    if (r.op.rfind("bwd", 0) == 0) bwd = &r;
  }
  fmt::print(
      rep,
      "\n  useful FLOPs: forward 2*B*L*H*R*(64*(N+P) + 2*N*P) = {:.3g}; backward counted as 3x "
      "the forward; step: per-token time over a stream of {} steps (batch {})\n",
      forward_flops(cfg), kStepStream, cfg.B);
  // What the backward row measured: with saved activations ("bwd") or without ("bwd-recompute":
  // --recompute, or a configuration whose lane saves nothing, e.g. the cuda lane off its
  // tensor-core path or with MAMBA3_CUDA_SAVE_TILES=0).
  const bool saved_ran = bwd ? bwd->op == "bwd" : o.use_saved;
  fmt::print(rep, "  {}\n",
             saved_ran ? "training mode: the forward also writes final states and the saved "
                         "activations (ForwardArgs::saved) that the backward reads"
             : o.use_saved
                 ? "the backward recomputes the forward's activations: the lane saves none for "
                   "this configuration"
                 : "--recompute: the backward recomputes the forward (no saved activations)");
  double copy_bw = 0, bf16_rate = 0;
  if (lane == Lane::kCuda) {
    fmt::print(stderr, "[bench] device copy bandwidth and bf16 matmul rate ...\n");
    if (Status st = cuda::measure_copy_bandwidth(&copy_bw); !st.ok()) return fail(st.ToString());
    if (Status st = cuda::measure_bf16_matmul(&bf16_rate); !st.ok()) return fail(st.ToString());
    fmt::print(rep, "  device: {}\n", cuda::device_summary());
    fmt::print(rep, "  ceilings (same run): copy {:.2f} TB/s (read + write), bf16 matmul {:.0f} "
               "TFLOP/s (cuBLAS 8192^3)\n", copy_bw * 1e-12, bf16_rate * 1e-12);
    if (fwd) {
      const double floor_s = forward_min_bytes(problem) / copy_bw;
      fmt::print(rep, "  forward: memory floor {} ({:.3g} bytes at the copy rate): {:.2f}x the "
                 "floor; useful FLOP/s {:.1f}% of bf16 matmul\n", format_seconds(floor_s),
                 forward_min_bytes(problem), fwd->timing.median_s / floor_s,
                 100.0 * fwd->gflops * 1e9 / bf16_rate);
    }
    for (const OpResult& r : results)
      if (r.op == "step") {
        const auto& c = problem.config();
        const double state_bytes = 2.0 * c.B * c.H * (c.P * c.N + c.R * c.N + c.P + c.NA) * 4;
        fmt::print(rep, "  step: fp32 state read + written {:.3g} bytes per step = {:.1f}% of copy "
                   "bandwidth\n", state_bytes, 100.0 * state_bytes / r.timing.median_s / copy_bw);
        // A state that fits the L2 cache about twice over partly stays there between steps
        // (H200, batch 16: 113 % "of copy bandwidth"): say so rather than let it pass as DRAM.
        double l2 = 0;
        if (Status st = cuda::l2_cache_bytes(&l2); !st.ok()) return fail(st.ToString());
        if (state_bytes / 2 < 2 * l2)
          fmt::print(rep, "  step: the state ({:.3g} bytes) is under twice the L2 cache ({:.3g} "
                     "bytes), so part of it stays in L2 between steps: not a DRAM-bandwidth "
                     "figure\n", state_bytes / 2, l2);
      }
  }
  if (sgemm > 0) {
    fmt::print(rep, "  fp32 matrix multiply (Eigen, n=1024, same threads): {:.1f} GFLOP/s\n",
               sgemm);
    if (fwd)
      fmt::print(rep, "  forward: {:.1f}% of the fp32 matrix-multiply rate\n",
                 100.0 * fwd->gflops / sgemm);
  }
  if (fwd && bwd) {
    fmt::print(rep, "  backward / forward time: {:.2f}\n",
               bwd->timing.median_s / fwd->timing.median_s);
  }

  if (!o.json.empty()) {
    nlohmann::json doc;
    doc["version"] = version();
    doc["commit"] = build_commit();
    doc["shape"] = o.shape;
    doc["config"] = {{"B", cfg.B}, {"L", cfg.L}, {"H", cfg.H},   {"G", cfg.G},      {"N", cfg.N},
                     {"P", cfg.P}, {"R", cfg.R}, {"NA", cfg.NA}, {"dtype", o.dtype}};
    doc["lane"] = o.lane;
    doc["threads"] = o.threads;
    doc["warmup"] = o.warmup;
    doc["iters"] = o.iters;
    doc["backward_mode"] = saved_ran ? "saved" : "recompute";
    doc["flop_model"] = "forward 2*B*L*H*R*(64*(N+P)+2*N*P); backward 3x forward";
    doc["ops"] = nlohmann::json::array();
    for (const OpResult& r : results) {
      nlohmann::json j = {{"op", r.op},
                          {"median_s", r.timing.median_s},
                          {"min_s", r.timing.min_s},
                          {"samples_s", r.timing.samples_s},
                          {"tokens_per_s", r.tokens_per_s}};
      if (r.gflops > 0) j["gflops"] = r.gflops;
      if (r.op == "step") j["per"] = "token (stream of " + std::to_string(kStepStream) + ")";
      doc["ops"].push_back(j);
    }
    if (copy_bw > 0) {
      doc["copy_bytes_per_s"] = copy_bw;
      doc["bf16_matmul_flops"] = bf16_rate;
      doc["forward_min_bytes"] = forward_min_bytes(problem);
    }
    if (sgemm > 0) {
      doc["sgemm_gflops"] = sgemm;
      if (fwd) doc["fwd_fraction_of_sgemm"] = fwd->gflops / sgemm;
    }
    if (fwd && bwd) doc["bwd_over_fwd"] = bwd->timing.median_s / fwd->timing.median_s;
    const std::string text = doc.dump(2) + "\n";
    if (o.json == "-") {
      std::cout << text;
    } else {
      std::ofstream f(o.json);
      f << text;
      if (!f) return fail("cannot write " + o.json);
    }
  }
  return 0;
}

}  // namespace mamba3::cli
