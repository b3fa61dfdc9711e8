// The fast float32 CPU lane: chunked evaluation (DESIGN.md §2.5) with Eigen for the per-chunk
// matrix products and OpenMP over (sequence, head). Deterministic: every reduction has a fixed
// order independent of the thread count.
#pragma once

#include "core/validate.h"
#include "mamba3/mamba3.h"

namespace mamba3::cpu {

Status forward(const ForwardArgs& args, const Dims& dims);
Status backward(const BackwardArgs& args, const Dims& dims);
Status step(const StepArgs& args, const Dims& dims);

// Layout of ForwardArgs::saved on this lane: a 16-int32 header (magic, version, dims, chunk
// size) then, per (sequence, head) in order, the chunk-start states (chunks, P, N) and the
// pre-gate y (n, R, P), all float32.
int64_t saved_numel(const Inputs& in, const Dims& dims);

// fp32 n x n matrix-multiply rate (GFLOP/s, median of runs lasting >= min_seconds in total) of
// the matrix library this lane uses, on `num_threads` threads (0 = all).
double measure_sgemm_gflops(int n, int num_threads, double min_seconds);
int max_threads();
std::string matrix_library();  // e.g. "Eigen 3.4.0 (AVX2 FMA)"

}  // namespace mamba3::cpu
