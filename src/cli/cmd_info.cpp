// mamba3 info: what this build contains and what is usable on this machine now.
#include <fmt/core.h>

#include <sstream>

#include "cli/commands.h"
#include "cuda/cuda_lane.h"
#include "mamba3/mamba3.h"

namespace mamba3::cli {

int run_info() {
  fmt::print("mamba3 {}\n\nbuild options:\n", version());
  std::istringstream options(build_options());
  for (std::string line; std::getline(options, line);) {
    if (!line.empty()) fmt::print("  {}\n", line);
  }

  fmt::print("\nlanes:\n  {:<10} {:<9} {:<10} {}\n", "lane", "compiled", "available", "detail");
  for (const LaneInfo& lane : lanes()) {
    fmt::print("  {:<10} {:<9} {:<10} {}\n", lane.name, lane.compiled ? "yes" : "no",
               lane.available ? "yes" : "no", lane.detail);
  }

  // No CUDA kernel is compiled yet (issues 4/5); the list will come from the generated
  // instantiation list once there is one.
  fmt::print("\nCUDA configurations served by this build:\n  {}\n", cuda::supported_configurations());

  fmt::print(
      "\ngates (unset = default path; set where not implemented = error naming the gate):\n");
  for (const GateInfo& gate : gates()) {
    fmt::print("  {:<24} {}\n", gate.env_var, gate.set ? "set" : "unset");
    fmt::print("      {}\n      implemented: {}\n", gate.description, gate.implemented);
  }
  return 0;
}

}  // namespace mamba3::cli
