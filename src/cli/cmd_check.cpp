// mamba3 check: golden vectors through the lanes, one line per metric.
#include <fmt/core.h>

#include <filesystem>

#include "check/golden.h"
#include "cli/commands.h"

namespace mamba3::cli {
namespace {

Lane parse_lane(const std::string& name) {
  if (name == "reference") return Lane::kReference;
  if (name == "cuda") return Lane::kCuda;
  return Lane::kCpu;
}

// Why the cuda lane cannot run here ("" when it can).
std::string cuda_unavailable_reason() {
  for (const LaneInfo& info : lanes()) {
    if (info.name == "cuda") return info.available ? "" : info.detail;
  }
  return "this build reports no cuda lane";
}

}  // namespace

int run_check(const CheckOptions& opts) {
  std::vector<std::string> files = opts.golden;
  if (files.empty()) {
    const std::string dir = check::golden_dir(MAMBA3_DEFAULT_GOLDEN_DIR);
    Status st = check::list_golden_files(dir, &files);
    if (!st.ok()) {
      fmt::print(stderr, "mamba3 check: {}\n", st.ToString());
      return 1;
    }
  }
  std::vector<std::string> lane_names = {opts.lane};
  if (opts.lane == "all") lane_names = {"reference", "cpu", "cuda"};

  int cases_passed = 0, cases_failed = 0, metrics_run = 0, metrics_failed = 0;
  bool error = false;
  for (const std::string& lane_name : lane_names) {
    std::string not_run = lane_name == "cuda" ? cuda_unavailable_reason() : "";
    for (const std::string& file : files) {
      std::vector<check::CaseReport> reports;
      if (not_run.empty()) {
        Status st = check::run_golden_file(file, parse_lane(lane_name), &reports, opts.forward_only);
        if (st.code() == StatusCode::kNotSupported) {
          not_run = st.ToString();
        } else if (!st.ok()) {
          fmt::print(stderr, "mamba3 check: {}\n", st.ToString());
          error = true;
          continue;
        }
      }
      if (!not_run.empty()) {
        // A lane that cannot run here is skipped with its reason under --lane all, and an
        // error when it was asked for by name.
        if (opts.lane != "all") {
          fmt::print(stderr, "mamba3 check: {} lane unavailable: {}\n", lane_name, not_run);
          return 1;
        }
        fmt::print("\n{}: not run ({})\n", lane_name, not_run);
        break;
      }
      const std::string base = std::filesystem::path(file).filename().string();
      for (const check::CaseReport& r : reports) {
        fmt::print("\n== {} :: {} :: lane {} ==\n", base, r.case_name, r.lane);
        if (!r.metrics.empty()) fmt::print("{}\n", check::format_metric_header());
        for (const check::Metric& m : r.metrics) {
          fmt::print("{}\n", check::format_metric(m));
          ++metrics_run;
          metrics_failed += !m.pass;
        }
        if (!r.status.ok()) fmt::print("  error: {}\n", r.status.ToString());
        fmt::print("  case {}\n", r.pass ? "PASS" : "FAIL");
        (r.pass ? cases_passed : cases_failed)++;
      }
    }
  }
  fmt::print("\n{} metrics checked, {} failed\n", metrics_run, metrics_failed);
  fmt::print("{} passed, {} failed\n", cases_passed, cases_failed);
  return (cases_failed > 0 || error) ? 1 : 0;
}

}  // namespace mamba3::cli
