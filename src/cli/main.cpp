// The mamba3 command: info, check, bench, demo.
#include <fmt/core.h>

#include <CLI/CLI.hpp>

#include "cli/commands.h"
#include "mamba3/mamba3.h"

int main(int argc, char** argv) {
  using namespace mamba3::cli;
  CLI::App app{"mamba3: Mamba-3 state-space layer kernels (reference, cpu and cuda lanes)"};
  app.set_version_flag("--version", std::string(mamba3::version()));
  app.require_subcommand(1);

  CLI::App* info = app.add_subcommand("info", "Version, build options, lanes and gates");

  CheckOptions check;
  CLI::App* check_cmd =
      app.add_subcommand("check", "Run golden vectors through the lanes and compare");
  check_cmd->add_option("--golden", check.golden,
                        "Golden .safetensors files (default: the bundled tests/data/golden; "
                        "$MAMBA3_GOLDEN_DIR overrides the folder)");
  check_cmd->add_flag("--forward-only", check.forward_only,
                      "Check outputs and final states only (no backward)");
  check_cmd->add_option("--lane", check.lane, "Lane to check")
      ->check(CLI::IsMember({"reference", "cpu", "cuda", "all"}))
      ->capture_default_str();

  BenchOptions bench;
  CLI::App* bench_cmd = app.add_subcommand("bench", "Time forward, backward and decode steps");
  bench_cmd->add_option("--shape", bench.shape, "Named shape")
      ->check(CLI::IsMember({"cpu", "cpu-mimo", "train", "long", "wide", "megacpp"}))
      ->capture_default_str();
  bench_cmd->add_option("-B", bench.B, "Batch (overrides the shape)");
  bench_cmd->add_option("-L", bench.L, "Sequence length (overrides the shape)");
  bench_cmd->add_option("-H", bench.H, "Heads (overrides the shape)");
  bench_cmd->add_option("-G", bench.G, "Groups of q/k heads (overrides the shape)");
  bench_cmd->add_option("-N", bench.N, "State size (overrides the shape)");
  bench_cmd->add_option("-P", bench.P, "Head dim (overrides the shape)");
  bench_cmd->add_option("-R", bench.R, "MIMO rank (overrides the shape and --rank)");
  bench_cmd->add_option("--rank", bench.rank,
                        "MIMO rank of the named shape (default 1; megacpp 4; cpu-mimo 4)");
  bench_cmd->add_option("--lane", bench.lane, "Lane")
      ->check(CLI::IsMember({"cpu", "reference", "cuda"}))
      ->capture_default_str();
  bench_cmd->add_option("--dtype", bench.dtype, "Dtype of q, k, v, z, trap and out")
      ->check(CLI::IsMember({"f32", "bf16"}))
      ->capture_default_str();
  bench_cmd->add_option("--warmup", bench.warmup, "Untimed runs first")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  bench_cmd->add_option("--iters", bench.iters, "Timed runs")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench_cmd->add_option("--threads", bench.threads, "cpu lane threads (0 = all)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  bench_cmd->add_option("--json", bench.json, "Also write the results as JSON (- for stdout)");
  bench_cmd->add_flag("--recompute{false}", bench.use_saved,
                     "Backward without the forward's saved activations (recomputes the forward)");
  bench_cmd->add_option("--what", bench.what, "Comma-separated ops: fwd, bwd, step")
      ->capture_default_str();

  CLI::App* demo = app.add_subcommand(
      "demo", "SISO and MIMO layers: timed forward, backward, decode; then a correctness check");

  CLI11_PARSE(app, argc, argv);

  if (info->parsed()) return run_info();
  if (check_cmd->parsed()) return run_check(check);
  if (bench_cmd->parsed()) return run_bench(bench);
  if (demo->parsed()) return run_demo();
  fmt::print(stderr, "mamba3: no subcommand\n");
  return 2;
}
