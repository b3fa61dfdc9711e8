// mamba3::forward / backward on the cpu lane for a few small shapes, inputs from check::Problem.
// Counters (rates): tokens/s and useful GFLOP/s (the FLOP model of `mamba3 bench`).
#include <benchmark/benchmark.h>

#include <cstdint>

#include "check/problem.h"

namespace {

using mamba3::check::Problem;

// (B, L, H, N, P, R)
Problem make_problem(const benchmark::State& state) {
  return Problem(mamba3::check::default_config(state.range(0), state.range(1), state.range(2), 1,
                                               state.range(3), state.range(4), state.range(5),
                                               /*seed=*/1));
}

double forward_flops(const benchmark::State& s) {
  const double B = s.range(0), L = s.range(1), H = s.range(2), N = s.range(3), P = s.range(4),
               R = s.range(5);
  return 2.0 * B * L * H * R * (64.0 * (N + P) + 2.0 * N * P);
}

void set_counters(benchmark::State& state, double flops) {
  const double tokens = static_cast<double>(state.range(0) * state.range(1));
  state.counters["tokens"] =
      benchmark::Counter(tokens * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["GFLOP"] =
      benchmark::Counter(flops * 1e-9 * state.iterations(), benchmark::Counter::kIsRate);
}

void BM_Forward(benchmark::State& state) {
  Problem p = make_problem(state);
  mamba3::check::HostTensor out = p.make_out(mamba3::DType::kF32);
  mamba3::ForwardArgs args;
  args.in = p.inputs();
  args.out = out.view();
  args.lane = mamba3::Lane::kCpu;
  for (auto _ : state) {
    mamba3::Status st = mamba3::forward(args);
    if (!st.ok()) {
      state.SkipWithError(st.ToString().c_str());
      break;
    }
  }
  set_counters(state, forward_flops(state));
}

void BM_Backward(benchmark::State& state) {
  Problem p = make_problem(state);
  mamba3::check::HostTensor d_out = p.random_d_out(mamba3::DType::kF32, /*seed=*/2);
  mamba3::check::GradBuffers grads = p.make_grads(/*f64=*/false);
  mamba3::BackwardArgs args;
  args.in = p.inputs();
  args.d_out = d_out.view();
  args.grads = grads.view();
  args.lane = mamba3::Lane::kCpu;
  for (auto _ : state) {
    mamba3::Status st = mamba3::backward(args);
    if (!st.ok()) {
      state.SkipWithError(st.ToString().c_str());
      break;
    }
  }
  set_counters(state, 3.0 * forward_flops(state));  // backward counted as 3x the forward
}

void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"B", "L", "H", "N", "P", "R"});
  b->Args({1, 1024, 4, 64, 32, 1});
  b->Args({1, 1024, 4, 64, 32, 4});
  b->Args({1, 4096, 8, 128, 64, 1});
  b->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Forward)->Apply(Shapes);
BENCHMARK(BM_Backward)->Apply(Shapes);

}  // namespace

BENCHMARK_MAIN();
