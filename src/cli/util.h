// Helpers shared by the mamba3 subcommands: timing, decode-token slices of a problem, prefixes,
// the FLOP model and the lists of states and gradients.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "check/host_tensor.h"
#include "check/problem.h"
#include "mamba3/mamba3.h"

namespace mamba3::cli {

using check::GradBuffers;
using check::HostTensor;
using check::Problem;
using check::StateBuffers;

// ---------------------------------------------------------------------------------------------
// Timing

struct Timing {
  double median_s = 0, min_s = 0;
  std::vector<double> samples_s;
};

// Runs `fn` `warmup` times untimed, then `iters` times timed; stops at the first error.
Status time_runs(int warmup, int iters, const std::function<Status()>& fn, Timing* timing);
// Median and min of timing->samples_s (samples timed elsewhere, e.g. with CUDA events).
void summarize(Timing* timing);

// ---------------------------------------------------------------------------------------------
// Problems

// Useful FLOPs of one forward (DESIGN.md §2.5 with 64-token chunks):
// 2*B*L*H*R*(64*(N+P) + 2*N*P). The backward is counted as 3x this.
double forward_flops(const check::ProblemConfig& c);

// The inputs of token `t` of a problem, laid out for one decode step (L axis removed).
struct StepTokens {
  HostTensor q, k;           // (B, R, G, N); SISO (B, G, N)
  HostTensor v, z;           // (B, H, P)
  HostTensor adt, dt, trap;  // (B, H)
  HostTensor angles;         // (B, H, NA)
};
StepTokens step_tokens(const Problem& p, int64_t t);

// Output shape of one decode step: (B, H, P) or (B, R, H, P).
std::vector<int64_t> step_out_shape(const Problem& p);

// Decode-step arguments viewing `tok`, the problem's parameters, `state` and `out`.
StepArgs step_args(const Problem& p, const StepTokens& tok, const States& state, const Tensor& out,
                   Lane lane);

// Copy of state buffers converted to `dtype`.
StateBuffers states_as(const StateBuffers& s, DType dtype);

// ("state_angle", &s.angle), ... for the defined buffers.
std::vector<std::pair<std::string, const HostTensor*>> state_list(const StateBuffers& s,
                                                                  const std::string& prefix);
// ("grad.q", &g.q), ... for the defined buffers.
std::vector<std::pair<std::string, const HostTensor*>> grad_list(const GradBuffers& g);

// "1.23 ms", "456 us", "2.1 s".
std::string format_seconds(double s);
// "12.3 M", "4.56 k".
std::string format_rate(double per_s);

}  // namespace mamba3::cli
