// mamba3 info: what this build contains and what is usable on this machine now.
#include <cstdlib>
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

  fmt::print("\nCUDA configurations served by this build:\n  {}\n", cuda::supported_configurations());

  fmt::print(
      "\ngates (unset = default path; set where not implemented = error naming the gate):\n");
  for (const GateInfo& gate : gates()) {
    const char* env = std::getenv(gate.env_var.c_str());
    fmt::print("  {:<28} {} (environment: {})\n", gate.env_var, gate.set ? "on" : "off",
               env ? fmt::format("'{}'", env) : std::string("unset"));
    fmt::print("      {}\n      implemented: {}\n", gate.description, gate.implemented);
  }
  return 0;
}

}  // namespace mamba3::cli
