// Entry points: validation, gates, lane dispatch and build information.
#include <cstdlib>
#include <string>

#include "core/build_commit.h"
#include "core/return_if_error.h"
#include "core/validate.h"
#include "cpu/cpu_lane.h"
#include "cuda/cuda_lane.h"
#include "mamba3/mamba3.h"
#include "reference/reference.h"

#ifndef MAMBA3_VERSION
#define MAMBA3_VERSION "0.1.0"
#endif

namespace mamba3 {
namespace {

// A gate is on for "1", "true", "on", "yes"; off for "0", "false", "off", "no"; unset when the
// variable is unset or empty. Anything else is an error so a typo never silently selects a path.
Status read_gate(const char* name, GateValue* value) {
  const char* v = std::getenv(name);
  *value = GateValue::kUnset;
  if (v == nullptr) return Status::Ok();
  const std::string s(v);
  if (s.empty()) return Status::Ok();
  if (s == "0" || s == "false" || s == "off" || s == "no") {
    *value = GateValue::kOff;
    return Status::Ok();
  }
  if (s == "1" || s == "true" || s == "on" || s == "yes") {
    *value = GateValue::kOn;
    return Status::Ok();
  }
  return Status::InvalidArgument(std::string(name) + ": expected 0 or 1, got \"" + s + "\"");
}

// PsiV cache (DESIGN.md §3): only the cuda lane implements it (on its tensor-core path, which
// it checks itself), so asking for it elsewhere fails.
Status check_psiv_gate(Lane lane) {
  GateValue v = GateValue::kUnset;
  M3_RETURN_IF_ERROR(psiv_cache_gate(&v));
  if (v == GateValue::kOn && lane != Lane::kCuda)
    return Status::NotSupported(std::string(kPsivGate) + "=1: the PsiV cache is not implemented on the " +
                                lane_name(lane) +
                                " lane of this build; unset the gate to run the default path");
  return Status::Ok();
}

Lane resolve_lane(Lane requested, const Dims& d, DType activation_dtype) {
  if (requested != Lane::kAuto) return requested;
  if (d.device == Device::kCUDA) return Lane::kCuda;
  return activation_dtype == DType::kF64 ? Lane::kReference : Lane::kCpu;
}

// ForwardArgs::saved / BackwardArgs::saved: optional, 1-D float32, sized for the lane.
Status check_saved(const Tensor& saved, Lane lane, const Inputs& in, const Dims& d) {
  if (!saved.defined()) return Status::Ok();
  // The reference lane saves nothing (an empty buffer); the cuda lane saves where its forward
  // and backward take the tensor cores (cuda::saved_numel), else nothing.
  int64_t want = 0;
  if (lane == Lane::kCpu) want = cpu::saved_numel(in, d);
  if (lane == Lane::kCuda) {
    // An empty buffer is always accepted there: nothing is saved, the backward recomputes.
    if (saved.ndim == 1 && saved.dtype == DType::kF32 && saved.shape[0] == 0) return Status::Ok();
    M3_RETURN_IF_ERROR(cuda::saved_numel(in, d, &want));
  }
  if (saved.ndim != 1 || saved.dtype != DType::kF32 || saved.shape[0] != want ||
      saved.device != d.device || (want > 0 && saved.data == nullptr))
    return Status::InvalidArgument(
        "saved: expected a (" + std::to_string(want) +
        ",) float32 tensor on the inputs' device for the " + lane_name(lane) + " lane, got " +
        saved.shape_string() + " " + dtype_name(saved.dtype) +
        (lane == Lane::kCuda ? " (the size follows MAMBA3_CUDA_SAVE_TILES, "
                               "MAMBA3_CUDA_SAVE_Y, MAMBA3_CUDA_BWD_MIMO_TC and "
                               "MAMBA3_PSIV_CACHE: keep them unchanged between the "
                               "forward and its backward)"
                             : ""));
  if (want > 0 && saved.strides[0] != 1)
    return Status::InvalidArgument("saved: must be contiguous (stride 1), got stride " +
                                   std::to_string(saved.strides[0]));
  return Status::Ok();
}

}  // namespace

Status psiv_cache_gate(GateValue* value) { return read_gate(kPsivGate, value); }

Status saved_numel(const ForwardArgs& args, int64_t* numel) {
  Dims d;
  ForwardArgs a = args;
  a.saved = Tensor{};
  M3_RETURN_IF_ERROR(validate_forward(a, &d));
  const Lane lane = resolve_lane(args.lane, d, args.in.v.dtype);
  switch (lane) {
    case Lane::kReference: *numel = 0; return Status::Ok();
    case Lane::kCpu: *numel = cpu::saved_numel(args.in, d); return Status::Ok();
    case Lane::kCuda: return cuda::saved_numel(args.in, d, numel);
    case Lane::kAuto: break;
  }
  return Status::Internal("saved_numel: unresolved lane");
}

Status validate(const ForwardArgs& args) {
  Dims d;
  return validate_forward(args, &d);
}
Status validate(const BackwardArgs& args) {
  Dims d;
  return validate_backward(args, &d);
}
Status validate(const StepArgs& args) {
  Dims d;
  return validate_step(args, &d);
}

Status forward(const ForwardArgs& args) {
  Dims d;
  M3_RETURN_IF_ERROR(validate_forward(args, &d));
  const Lane lane = resolve_lane(args.lane, d, args.in.v.dtype);
  M3_RETURN_IF_ERROR(check_psiv_gate(lane));
  M3_RETURN_IF_ERROR(check_saved(args.saved, lane, args.in, d));
  switch (lane) {
    case Lane::kReference: return reference::forward<double>(args);
    case Lane::kCpu: return cpu::forward(args, d);
    case Lane::kCuda: return cuda::forward(args);
    case Lane::kAuto: break;
  }
  return Status::Internal("forward: unresolved lane");
}

Status backward(const BackwardArgs& args) {
  Dims d;
  M3_RETURN_IF_ERROR(validate_backward(args, &d));
  const Lane lane = resolve_lane(args.lane, d, args.in.v.dtype);
  M3_RETURN_IF_ERROR(check_psiv_gate(lane));
  M3_RETURN_IF_ERROR(check_saved(args.saved, lane, args.in, d));
  switch (lane) {
    case Lane::kReference: return reference::backward<double>(args);
    case Lane::kCpu: return cpu::backward(args, d);
    case Lane::kCuda: return cuda::backward(args);
    case Lane::kAuto: break;
  }
  return Status::Internal("backward: unresolved lane");
}

Status step(const StepArgs& args) {
  Dims d;
  M3_RETURN_IF_ERROR(validate_step(args, &d));
  const Lane lane = resolve_lane(args.lane, d, args.v.dtype);
  switch (lane) {
    case Lane::kReference: return reference::step<double>(args);
    case Lane::kCpu: return cpu::step(args, d);
    case Lane::kCuda: return cuda::step(args);
    case Lane::kAuto: break;
  }
  return Status::Internal("step: unresolved lane");
}

const char* version() { return MAMBA3_VERSION; }

std::vector<LaneInfo> lanes() {
  std::vector<LaneInfo> out;
  out.push_back({"reference", true, true, "float64 token-by-token recurrence; forward, backward, step"});
  out.push_back({"cpu", true, true,
                 "float32 chunked, " + std::to_string(cpu::max_threads()) + " threads, " +
                     cpu::matrix_library() + "; forward, backward, step"});
  const bool cuda_compiled = cuda::compiled();
  const int devices = cuda_compiled ? cuda::device_count() : 0;
  out.push_back({"cuda", cuda_compiled, cuda_compiled && devices > 0,
                 std::string(cuda_compiled ? "built for sm_90a; " : "not built; ") +
                     std::to_string(devices) + " device(s) visible (" + cuda::device_summary() +
                     "); " + cuda::supported_configurations()});
  return out;
}

Status release_cached_memory(size_t* released_bytes) {
  return cuda::release_workspace(released_bytes);
}

namespace {

// A cuda-lane gate that is on unless its variable is "0" (unset or "1": on; the lane rejects any
// other value, and the description then says so).
GateInfo default_on_gate(const char* name, const std::string& description,
                         const char* implemented) {
  const char* env = std::getenv(name);
  const std::string v = env ? env : "";
  const bool valid = v.empty() || v == "0" || v == "1";
  return {name,
          description +
              (valid ? "" : " (current value invalid: '" + v + "', expected 0 or 1)"),
          v != "0", cuda::compiled() ? implemented : "not in this build (no cuda lane)"};
}

}  // namespace

std::vector<GateInfo> gates() {
  GateValue v = GateValue::kUnset;
  Status st = psiv_cache_gate(&v);
  std::vector<GateInfo> out = {
      {kPsivGate,
       "MIMO: materialize PsiV = V * psi in the forward and read it in the backward (1: on; "
       "0: off, the backward computes it again from v; unset: on where psi (mimo_v) is given, "
       "off otherwise)" +
           std::string(!st.ok() ? " (current value invalid: " + st.message() + ")"
                       : v == GateValue::kUnset
                           ? " (unset now: decided per call, on where psi is given)"
                           : ""),
       v == GateValue::kOn,
       cuda::compiled()
           ? "cuda lane, tensor-core path (bf16 q, k, v at N, P in {64, 128}): the tile records "
             "the training forward saves (or the backward's loader writes) carry v psi; "
             "elsewhere (cpu, reference, cuda SIMT kernels) setting it to 1 makes the call fail "
             "with an error naming it"
           : "none in this build (no cuda lane): setting it to 1 makes every forward/backward "
             "call fail with an error naming it"}};
  // Parsed by the cuda lane (src/cuda/chunk_bwd/bwd_launch.cuh), which rejects other values.
  out.push_back(default_on_gate("MAMBA3_CUDA_BWD_MIMO_TC",
                                "bf16 MIMO backward on the tensor-core kernels (unset or 1, the "
                                "default); 0 runs the fp32 SIMT kernels instead",
                                "cuda lane (bf16 q, k, v at N, P in {64, 128})"));
  // Parsed by the cuda lane (src/cuda/chunk_bwd/bwd_launch.cuh), which rejects other values.
  out.push_back(default_on_gate(
      "MAMBA3_CUDA_SAVE_TILES",
      "training forward writes the tensor-core path's tile records, chunk-start states and "
      "decays into ForwardArgs::saved for the backward (unset or 1, the default); 0 saves "
      "nothing and the backward recomputes them",
      "cuda lane (bf16 q, k, v at N, P in {64, 128})"));
  // Parsed by the cuda lane (src/cuda/common/tile_record.cuh), which rejects other values.
  out.push_back(default_on_gate(
      "MAMBA3_CUDA_SAVE_Y",
      "with MAMBA3_CUDA_SAVE_TILES, the saved buffer also carries each chunk's fp32 y before the "
      "output stage (R P 4 bytes per token and head), so the backward does not recompute it "
      "(unset or 1, the default); 0 leaves it out and the backward recomputes y",
      "cuda lane (bf16 q, k, v at N, P in {64, 128})"));
  // Parsed by the cuda lane (src/cuda/step/step_persist_launch.cuh), which rejects other values
  // and a 1 where the persistent kernel does not apply.
  out.push_back(default_on_gate(
      "MAMBA3_CUDA_STEP_PERSISTENT",
      "decode step on the persistent kernel that prefetches the next (batch, head) (unset or 1, "
      "the default where it applies); 0 takes one CTA per (batch, head)",
      "cuda lane (q, k, v, z, trap of one dtype, fp32 state at N in {64, 128})"));
  return out;
}

std::string build_options() {
  std::string s;
  s += "version=" + std::string(version()) + "\n";
  s += "commit=" + std::string(build_commit()) + "\n";
  s += "cuda=" + std::string(cuda::compiled() ? "on (sm_90a)" : "off") + "\n";
  s += "cpu_matrix_library=" + cpu::matrix_library() + "\n";
  s += "cpu_threads=" + std::to_string(cpu::max_threads()) + "\n";
#ifdef NDEBUG
  s += "build_type=release\n";
#else
  s += "build_type=debug (assertions on)\n";
#endif
#ifdef __AVX2__
  s += "cpu_isa=avx2";
#ifdef __FMA__
  s += "+fma";
#endif
#ifdef __AVX512F__
  s += "+avx512f";
#endif
  s += "\n";
#else
  s += "cpu_isa=baseline (no AVX2: configure with MAMBA3_NATIVE=ON for speed)\n";
#endif
  return s;
}

}  // namespace mamba3
