// The mamba3 subcommands. Each returns the process exit code and prints its own report; errors
// go to stderr.
#pragma once

#include <string>
#include <vector>

namespace mamba3::cli {

int run_info();

struct CheckOptions {
  std::vector<std::string> golden;  // empty: the bundled files
  std::string lane = "all";         // reference | cpu | cuda | all
  bool forward_only = false;  // outputs and final states only, no gradients
};
int run_check(const CheckOptions& opts);

struct BenchOptions {
  std::string shape = "cpu";
  // Explicit dimensions override the shape's (-1: the shape's value).
  long long B = -1, L = -1, H = -1, G = -1, N = -1, P = -1, R = -1;
  int rank = -1;  // R of the named shape (-1: its default)
  std::string lane = "cpu";
  std::string dtype = "f32";
  int warmup = 1, iters = 5, threads = 0;
  std::string json;  // "" none, "-" stdout
  std::string what = "fwd,bwd,step";
  // Training mode: the forward fills ForwardArgs::saved and the backward reads it. Off: the
  // backward recomputes the forward (--recompute).
  bool use_saved = true;
};
int run_bench(const BenchOptions& opts);

int run_demo();

}  // namespace mamba3::cli
