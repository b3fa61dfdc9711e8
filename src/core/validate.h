// Argument validation shared by every lane. validate_* fills a Dims on success; lanes rely on
// the checks done here (shapes, dtypes, devices, cu_seqlens values) and do not repeat them.
#pragma once

#include <cstdint>

#include "mamba3/mamba3.h"

namespace mamba3 {

struct Dims {
  int64_t B = 0, L = 0, H = 0, G = 0, N = 0, P = 0, R = 1, NA = 0;
  int64_t S = 0;              // number of sequences
  bool qk_siso_layout = false;  // q/k given as (B, L, G, N)
  bool bias_siso_layout = false;
  bool state_k_siso_layout = false;
  bool varlen = false;
  bool per_rank_out = false;  // out is (B, L, R, H, P)
  Device device = Device::kCPU;

  int64_t heads_per_group() const { return H / G; }
};

// Token range [begin, end) of sequence s inside batch row `batch`.
struct SeqRange {
  int64_t batch, begin, end;
};
SeqRange seq_range(const Inputs& in, const Dims& dims, int64_t s);

Status validate_inputs(const Inputs& in, Dims* dims);
Status validate_forward(const ForwardArgs& args, Dims* dims);
Status validate_backward(const BackwardArgs& args, Dims* dims);
// Step dims: L = 1, S = B.
Status validate_step(const StepArgs& args, Dims* dims);

// The PsiV cache gate (DESIGN.md §3), MAMBA3_PSIV_CACHE: on for "1", "true", "on", "yes"; off
// for "0", "false", "off", "no"; unset or empty: the lane's default (the cuda lane: on for MIMO
// with psi given, where it measured faster, NOTES.md); anything else is an error naming it. Read
// per call by the API (an explicit on fails on lanes without the cache) and by the cuda lane
// (the record layout).
inline constexpr const char* kPsivGate = "MAMBA3_PSIV_CACHE";
enum class GateValue { kUnset, kOn, kOff };
Status psiv_cache_gate(GateValue* value);

}  // namespace mamba3
