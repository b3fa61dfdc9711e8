// Runs golden-vector files (tests/data/golden/README.md) through a lane and compares every
// output, final state and gradient. Print-free: callers format the reports.
#pragma once

#include <string>
#include <vector>

#include "check/compare.h"
#include "mamba3/mamba3.h"

namespace mamba3::check {

struct CaseReport {
  std::string file, case_name, lane;
  Status status;                // not ok: the case could not be run (metrics may be partial)
  std::vector<Metric> metrics;  // "out.<name>" for outputs and final states, "grad.<name>"
  bool pass = false;            // status ok, at least one metric, every metric passes
};

// Runs every case of a golden file on `lane` and appends one report per case. Tolerances: the
// reference lane 1e-10 relative L2 on every metric; float32 lanes tolerance_from_naive() of the
// naive float32 evaluation (reference::forward<float>/backward<float>) on the same inputs.
// Returns an error (and appends nothing) when the file itself is unreadable or malformed;
// problems of one case go into that case's report. The cuda lane is refused (NotSupported)
// until the runner stages device buffers.
// `forward_only`: outputs and final states only (gradients neither run nor compared). The cuda
// lane runs on device copies of the host buffers (cuda::forward_staged / backward_staged).
Status run_golden_file(const std::string& path, Lane lane, std::vector<CaseReport>* reports,
                       bool forward_only = false);

// The golden directory: $MAMBA3_GOLDEN_DIR when set and non-empty, else `fallback`.
std::string golden_dir(const std::string& fallback);
// The *.safetensors files of a directory, sorted; an error when there are none.
Status list_golden_files(const std::string& dir, std::vector<std::string>* files);

}  // namespace mamba3::check
