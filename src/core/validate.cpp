#include "core/return_if_error.h"
#include "core/validate.h"

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "common/numeric.h"

namespace mamba3 {
namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  if (s.size() == 1) os << ",";
  os << ")";
  return os.str();
}

bool is_float(DType d) { return d != DType::kI32; }

// Which dtypes an argument accepts.
enum class Kind {
  kActivation,  // float32 / bfloat16 / float16 / float64
  kParam,       // float32 (float64 accepted so the reference lane runs in full precision)
  kOutput,      // any float dtype
  kIndex,       // int32
};

const char* kind_text(Kind k) {
  switch (k) {
    case Kind::kActivation: return "float32, bfloat16, float16 or float64";
    case Kind::kParam: return "float32 (or float64)";
    case Kind::kOutput: return "a float dtype";
    case Kind::kIndex: return "int32";
  }
  return "";
}

bool kind_accepts(Kind k, DType d) {
  switch (k) {
    case Kind::kActivation:
    case Kind::kOutput: return is_float(d);
    case Kind::kParam: return d == DType::kF32 || d == DType::kF64;
    case Kind::kIndex: return d == DType::kI32;
  }
  return false;
}

class Checker {
 public:
  explicit Checker(Device device) : device_(device) {}

  // Checks a defined tensor against an expected shape, dtype kind and device.
  Status check(const char* name, const Tensor& t, const std::vector<int64_t>& shape, Kind kind,
               bool required = true) const {
    if (!t.defined()) {
      if (required) return Status::InvalidArgument(std::string(name) + " is required but absent");
      return Status::Ok();
    }
    if (t.ndim > kMaxDims)
      return Status::InvalidArgument(std::string(name) + ": more than " +
                                     std::to_string(kMaxDims) +
                                     " dims, or strides and shape of different rank");
    std::vector<int64_t> got(t.shape, t.shape + t.ndim);
    if (got != shape)
      return Status::InvalidArgument(std::string(name) + ": expected shape " + shape_str(shape) +
                                     ", got " + shape_str(got));
    if (!kind_accepts(kind, t.dtype))
      return Status::InvalidArgument(std::string(name) + ": expected dtype " + kind_text(kind) +
                                     ", got " + dtype_name(t.dtype));
    if (t.device != device_)
      return Status::InvalidArgument(
          std::string(name) + ": expected device " + (device_ == Device::kCPU ? "cpu" : "cuda") +
          ", got " + (t.device == Device::kCPU ? "cpu" : "cuda"));
    for (int d = 0; d < t.ndim; ++d) {
      if (t.shape[d] < 0) return Status::InvalidArgument(std::string(name) + ": negative size");
      if (t.strides[d] < 0)
        return Status::InvalidArgument(std::string(name) + ": negative stride " +
                                       std::to_string(t.strides[d]) + " in dim " +
                                       std::to_string(d) + " (strides must be >= 0)");
    }
    if (t.numel() > 0 && t.data == nullptr)
      return Status::InvalidArgument(std::string(name) + ": null data pointer with " +
                                     std::to_string(t.numel()) + " elements");
    return Status::Ok();
  }

 private:
  Device device_;
};

// Every element finite (CPU tensors only; a CUDA tensor is not read here).
Status check_finite(const char* name, const Tensor& t) {
  if (!t.defined() || t.device != Device::kCPU || t.numel() == 0) return Status::Ok();
  const int64_t n = t.numel();
  // Fast scan of contiguous float32 data; the index of a bad value is found below.
  if (t.dtype == DType::kF32 && t.is_contiguous()) {
    const float* p = static_cast<const float*>(t.data);
    bool all_finite = true;
    for (int64_t i = 0; i < n; ++i) all_finite &= std::isfinite(p[i]);
    if (all_finite) return Status::Ok();
  }
  std::vector<int64_t> idx(static_cast<size_t>(t.ndim), 0);
  for (int64_t i = 0; i < n; ++i) {
    int64_t off = 0;
    for (int d = 0; d < t.ndim; ++d) off += idx[static_cast<size_t>(d)] * t.strides[d];
    double v = load_as_double(t.data, t.dtype, off);
    if (!std::isfinite(v)) {
      std::ostringstream os;
      os << name << ": non-finite value " << v << " at index (";
      for (int d = 0; d < t.ndim; ++d) os << (d ? ", " : "") << idx[static_cast<size_t>(d)];
      os << ")";
      return Status::InvalidArgument(os.str());
    }
    for (int d = t.ndim - 1; d >= 0; --d) {
      if (++idx[static_cast<size_t>(d)] < t.shape[d]) break;
      idx[static_cast<size_t>(d)] = 0;
    }
  }
  return Status::Ok();
}

Status check_states(const char* what, const States& st, const Dims& d, const Checker& c,
                    bool allow_subset, Kind kind) {
  if (!st.any()) return Status::Ok();
  if (!allow_subset && !st.all())
    return Status::InvalidArgument(std::string(what) +
                                   ": give all four states (angle, ssm, k, v) or none; got angle " +
                                   (st.angle.defined() ? "set" : "absent") + ", ssm " +
                                   (st.ssm.defined() ? "set" : "absent") + ", k " +
                                   (st.k.defined() ? "set" : "absent") + ", v " +
                                   (st.v.defined() ? "set" : "absent"));
  const std::string w(what);
  M3_RETURN_IF_ERROR(c.check((w + ".angle").c_str(), st.angle, {d.S, d.H, d.NA}, kind, false));
  M3_RETURN_IF_ERROR(c.check((w + ".ssm").c_str(), st.ssm, {d.S, d.H, d.P, d.N}, kind, false));
  if (st.k.defined()) {
    if (d.R == 1 && st.k.ndim == 3)
      M3_RETURN_IF_ERROR(c.check((w + ".k").c_str(), st.k, {d.S, d.H, d.N}, kind));
    else
      M3_RETURN_IF_ERROR(c.check((w + ".k").c_str(), st.k, {d.S, d.R, d.H, d.N}, kind));
  }
  M3_RETURN_IF_ERROR(c.check((w + ".v").c_str(), st.v, {d.S, d.H, d.P}, kind, false));
  return Status::Ok();
}

Status check_lane_device(Lane lane, Device device) {
  if ((lane == Lane::kReference || lane == Lane::kCpu) && device != Device::kCPU)
    return Status::InvalidArgument(std::string("lane: the ") + lane_name(lane) +
                                   " lane needs cpu tensors, got cuda tensors");
  if (lane == Lane::kCuda && device != Device::kCUDA)
    return Status::InvalidArgument("lane: the cuda lane needs cuda tensors, got cpu tensors");
  return Status::Ok();
}

}  // namespace

SeqRange seq_range(const Inputs& in, const Dims& dims, int64_t s) {
  if (!dims.varlen) return {s, 0, dims.L};
  const auto* cu = static_cast<const int32_t*>(in.cu_seqlens.data);
  const int64_t st = in.cu_seqlens.strides[0];
  return {0, cu[s * st], cu[(s + 1) * st]};
}

Status validate_inputs(const Inputs& in, Dims* out) {
  Dims d;
  if (!in.q.defined()) return Status::InvalidArgument("q is required but absent");
  if (in.q.ndim != 4 && in.q.ndim != 5)
    return Status::InvalidArgument("q: expected 5 dims (B, L, R, G, N) or 4 dims (B, L, G, N), got " +
                                   std::to_string(in.q.ndim) + " dims " + in.q.shape_string());
  d.device = in.q.device;
  Checker c(d.device);
  d.qk_siso_layout = in.q.ndim == 4;
  d.B = in.q.shape[0];
  d.L = in.q.shape[1];
  d.R = d.qk_siso_layout ? 1 : in.q.shape[2];
  d.G = in.q.shape[in.q.ndim - 2];
  d.N = in.q.shape[in.q.ndim - 1];
  if (!in.v.defined()) return Status::InvalidArgument("v is required but absent");
  if (in.v.ndim != 4)
    return Status::InvalidArgument("v: expected 4 dims (B, L, H, P), got " + in.v.shape_string());
  d.H = in.v.shape[2];
  d.P = in.v.shape[3];
  if (!in.angles.defined()) return Status::InvalidArgument("angles is required but absent");
  if (in.angles.ndim != 4)
    return Status::InvalidArgument("angles: expected 4 dims (B, L, H, NA), got " +
                                   in.angles.shape_string());
  d.NA = in.angles.shape[3];

  if (d.R < 1) return Status::InvalidArgument("q: rank R must be >= 1, got " + std::to_string(d.R));
  if (d.G < 1 || d.H < 1 || d.H % d.G != 0)
    return Status::InvalidArgument("q/v: heads H = " + std::to_string(d.H) +
                                   " must be a positive multiple of groups G = " +
                                   std::to_string(d.G));
  if (d.N < 2 || d.N % 2 != 0)
    return Status::InvalidArgument("q: state size N must be even and >= 2, got " +
                                   std::to_string(d.N));
  if (d.P < 1) return Status::InvalidArgument("v: head dim P must be >= 1, got " + std::to_string(d.P));
  if (d.NA < 0 || d.NA > d.N / 2)
    return Status::InvalidArgument("angles: NA = " + std::to_string(d.NA) +
                                   " must be <= N/2 = " + std::to_string(d.N / 2));

  std::vector<int64_t> qk_shape = d.qk_siso_layout
                                      ? std::vector<int64_t>{d.B, d.L, d.G, d.N}
                                      : std::vector<int64_t>{d.B, d.L, d.R, d.G, d.N};
  M3_RETURN_IF_ERROR(c.check("q", in.q, qk_shape, Kind::kActivation));
  M3_RETURN_IF_ERROR(c.check("k", in.k, qk_shape, Kind::kActivation));
  M3_RETURN_IF_ERROR(c.check("v", in.v, {d.B, d.L, d.H, d.P}, Kind::kActivation));
  M3_RETURN_IF_ERROR(c.check("adt", in.adt, {d.B, d.H, d.L}, Kind::kParam));
  M3_RETURN_IF_ERROR(c.check("dt", in.dt, {d.B, d.H, d.L}, Kind::kParam));
  M3_RETURN_IF_ERROR(c.check("trap", in.trap, {d.B, d.H, d.L}, Kind::kActivation));
  for (auto [name, t] : {std::pair{"q_bias", &in.q_bias}, std::pair{"k_bias", &in.k_bias}}) {
    if (t->defined() && d.R == 1 && t->ndim == 2) {
      d.bias_siso_layout = true;
      M3_RETURN_IF_ERROR(c.check(name, *t, {d.H, d.N}, Kind::kParam));
    } else {
      M3_RETURN_IF_ERROR(c.check(name, *t, {d.H, d.R, d.N}, Kind::kParam));
    }
  }
  M3_RETURN_IF_ERROR(c.check("angles", in.angles, {d.B, d.L, d.H, d.NA}, Kind::kParam));
  M3_RETURN_IF_ERROR(c.check("d", in.d, {d.H}, Kind::kParam, false));
  M3_RETURN_IF_ERROR(c.check("z", in.z, {d.B, d.L, d.H, d.P}, Kind::kActivation, false));
  M3_RETURN_IF_ERROR(c.check("mimo_v", in.mimo_v, {d.H, d.R, d.P}, Kind::kParam, false));
  M3_RETURN_IF_ERROR(c.check("mimo_z", in.mimo_z, {d.H, d.R, d.P}, Kind::kParam, false));
  M3_RETURN_IF_ERROR(c.check("mimo_o", in.mimo_o, {d.H, d.R, d.P}, Kind::kParam, false));
  M3_RETURN_IF_ERROR(c.check("norm_weight", in.norm_weight, {d.H, d.P}, Kind::kParam, false));
  if (!(in.norm_eps > 0.0f) || !std::isfinite(in.norm_eps))
    return Status::InvalidArgument("norm_eps: must be a positive finite number, got " +
                                   std::to_string(in.norm_eps));
  if (in.chunk_size < 1)
    return Status::InvalidArgument("chunk_size: must be >= 1, got " +
                                   std::to_string(in.chunk_size));

  // Packed sequences.
  d.varlen = in.cu_seqlens.defined();
  if (d.varlen) {
    if (in.cu_seqlens.ndim != 1 || in.cu_seqlens.shape[0] < 2)
      return Status::InvalidArgument("cu_seqlens: expected shape (S + 1,) with S >= 1, got " +
                                     in.cu_seqlens.shape_string());
    M3_RETURN_IF_ERROR(
        c.check("cu_seqlens", in.cu_seqlens, {in.cu_seqlens.shape[0]}, Kind::kIndex));
    if (d.B != 1)
      return Status::InvalidArgument("cu_seqlens: packed sequences need batch B == 1, got B = " +
                                     std::to_string(d.B));
    d.S = in.cu_seqlens.shape[0] - 1;
    if (d.device == Device::kCPU) {
      const auto* cu = static_cast<const int32_t*>(in.cu_seqlens.data);
      const int64_t st = in.cu_seqlens.strides[0];
      if (cu[0] != 0)
        return Status::InvalidArgument("cu_seqlens: must start at 0, got cu_seqlens[0] = " +
                                       std::to_string(cu[0]));
      for (int64_t s = 0; s < d.S; ++s)
        if (cu[(s + 1) * st] < cu[s * st])
          return Status::InvalidArgument(
              "cu_seqlens: must be non-decreasing, got cu_seqlens[" + std::to_string(s + 1) +
              "] = " + std::to_string(cu[(s + 1) * st]) + " < cu_seqlens[" + std::to_string(s) +
              "] = " + std::to_string(cu[s * st]));
      if (cu[d.S * st] != d.L)
        return Status::InvalidArgument("cu_seqlens: must end at L = " + std::to_string(d.L) +
                                       ", got cu_seqlens[" + std::to_string(d.S) +
                                       "] = " + std::to_string(cu[d.S * st]));
    }
  } else {
    d.S = d.B;
  }

  M3_RETURN_IF_ERROR(check_states("initial", in.initial, d, c, false, Kind::kParam));
  d.state_k_siso_layout = in.initial.k.defined() && in.initial.k.ndim == 3;

  // Values that steer the recurrence must be finite (activations propagate NaN like any op).
  M3_RETURN_IF_ERROR(check_finite("adt", in.adt));
  M3_RETURN_IF_ERROR(check_finite("dt", in.dt));
  M3_RETURN_IF_ERROR(check_finite("angles", in.angles));
  M3_RETURN_IF_ERROR(check_finite("trap", in.trap));

  d.per_rank_out = d.R > 1 && !in.mimo_o.defined();
  *out = d;
  return Status::Ok();
}

Status validate_forward(const ForwardArgs& a, Dims* dims) {
  Dims d;
  M3_RETURN_IF_ERROR(validate_inputs(a.in, &d));
  M3_RETURN_IF_ERROR(check_lane_device(a.lane, d.device));
  Checker c(d.device);
  std::vector<int64_t> out_shape = d.per_rank_out
                                       ? std::vector<int64_t>{d.B, d.L, d.R, d.H, d.P}
                                       : std::vector<int64_t>{d.B, d.L, d.H, d.P};
  M3_RETURN_IF_ERROR(c.check("out", a.out, out_shape, Kind::kOutput));
  M3_RETURN_IF_ERROR(check_states("final_states", a.final_states, d, c, false, Kind::kParam));
  if (a.num_threads < 0)
    return Status::InvalidArgument("num_threads: must be >= 0, got " +
                                   std::to_string(a.num_threads));
  *dims = d;
  return Status::Ok();
}

Status validate_backward(const BackwardArgs& a, Dims* dims) {
  Dims d;
  M3_RETURN_IF_ERROR(validate_inputs(a.in, &d));
  M3_RETURN_IF_ERROR(check_lane_device(a.lane, d.device));
  Checker c(d.device);
  std::vector<int64_t> out_shape = d.per_rank_out
                                       ? std::vector<int64_t>{d.B, d.L, d.R, d.H, d.P}
                                       : std::vector<int64_t>{d.B, d.L, d.H, d.P};
  M3_RETURN_IF_ERROR(c.check("d_out", a.d_out, out_shape, Kind::kOutput));
  M3_RETURN_IF_ERROR(check_states("d_final", a.d_final, d, c, true, Kind::kParam));
  const Grads& g = a.grads;
  const Inputs& in = a.in;
  // A gradient is optional; when given it must match its input's shape.
  auto same = [&](const char* name, const Tensor& grad, const Tensor& input) -> Status {
    if (!grad.defined()) return Status::Ok();
    if (!input.defined())
      return Status::InvalidArgument(std::string(name) +
                                     ": a gradient was requested for an input that is absent");
    return c.check(name, grad, std::vector<int64_t>(input.shape, input.shape + input.ndim),
                   Kind::kOutput);
  };
  M3_RETURN_IF_ERROR(same("grads.q", g.q, in.q));
  M3_RETURN_IF_ERROR(same("grads.k", g.k, in.k));
  M3_RETURN_IF_ERROR(same("grads.v", g.v, in.v));
  M3_RETURN_IF_ERROR(same("grads.adt", g.adt, in.adt));
  M3_RETURN_IF_ERROR(same("grads.dt", g.dt, in.dt));
  M3_RETURN_IF_ERROR(same("grads.trap", g.trap, in.trap));
  M3_RETURN_IF_ERROR(same("grads.q_bias", g.q_bias, in.q_bias));
  M3_RETURN_IF_ERROR(same("grads.k_bias", g.k_bias, in.k_bias));
  M3_RETURN_IF_ERROR(same("grads.angles", g.angles, in.angles));
  M3_RETURN_IF_ERROR(same("grads.d", g.d, in.d));
  M3_RETURN_IF_ERROR(same("grads.z", g.z, in.z));
  M3_RETURN_IF_ERROR(same("grads.mimo_v", g.mimo_v, in.mimo_v));
  M3_RETURN_IF_ERROR(same("grads.mimo_z", g.mimo_z, in.mimo_z));
  M3_RETURN_IF_ERROR(same("grads.mimo_o", g.mimo_o, in.mimo_o));
  M3_RETURN_IF_ERROR(same("grads.norm_weight", g.norm_weight, in.norm_weight));
  M3_RETURN_IF_ERROR(same("grads.initial.angle", g.initial.angle, in.initial.angle));
  M3_RETURN_IF_ERROR(same("grads.initial.ssm", g.initial.ssm, in.initial.ssm));
  M3_RETURN_IF_ERROR(same("grads.initial.k", g.initial.k, in.initial.k));
  M3_RETURN_IF_ERROR(same("grads.initial.v", g.initial.v, in.initial.v));
  if (a.num_threads < 0)
    return Status::InvalidArgument("num_threads: must be >= 0, got " +
                                   std::to_string(a.num_threads));
  *dims = d;
  return Status::Ok();
}

Status validate_step(const StepArgs& a, Dims* dims) {
  Dims d;
  if (!a.q.defined()) return Status::InvalidArgument("q is required but absent");
  if (a.q.ndim != 3 && a.q.ndim != 4)
    return Status::InvalidArgument("q: expected 4 dims (B, R, G, N) or 3 dims (B, G, N), got " +
                                   a.q.shape_string());
  d.device = a.q.device;
  Checker c(d.device);
  d.qk_siso_layout = a.q.ndim == 3;
  d.B = a.q.shape[0];
  d.L = 1;
  d.S = d.B;
  d.R = d.qk_siso_layout ? 1 : a.q.shape[1];
  d.G = a.q.shape[a.q.ndim - 2];
  d.N = a.q.shape[a.q.ndim - 1];
  if (!a.v.defined() || a.v.ndim != 3)
    return Status::InvalidArgument("v: expected 3 dims (B, H, P), got " + a.v.shape_string());
  d.H = a.v.shape[1];
  d.P = a.v.shape[2];
  if (!a.angles.defined() || a.angles.ndim != 3)
    return Status::InvalidArgument("angles: expected 3 dims (B, H, NA), got " +
                                   a.angles.shape_string());
  d.NA = a.angles.shape[2];
  if (d.R < 1) return Status::InvalidArgument("q: rank R must be >= 1, got " + std::to_string(d.R));
  if (d.G < 1 || d.H < 1 || d.H % d.G != 0)
    return Status::InvalidArgument("q/v: heads H = " + std::to_string(d.H) +
                                   " must be a positive multiple of groups G = " +
                                   std::to_string(d.G));
  if (d.N < 2 || d.N % 2 != 0)
    return Status::InvalidArgument("q: state size N must be even and >= 2, got " +
                                   std::to_string(d.N));
  if (d.NA < 0 || d.NA > d.N / 2)
    return Status::InvalidArgument("angles: NA = " + std::to_string(d.NA) +
                                   " must be <= N/2 = " + std::to_string(d.N / 2));
  std::vector<int64_t> qk_shape = d.qk_siso_layout ? std::vector<int64_t>{d.B, d.G, d.N}
                                                   : std::vector<int64_t>{d.B, d.R, d.G, d.N};
  M3_RETURN_IF_ERROR(c.check("q", a.q, qk_shape, Kind::kActivation));
  M3_RETURN_IF_ERROR(c.check("k", a.k, qk_shape, Kind::kActivation));
  M3_RETURN_IF_ERROR(c.check("v", a.v, {d.B, d.H, d.P}, Kind::kActivation));
  M3_RETURN_IF_ERROR(c.check("adt", a.adt, {d.B, d.H}, Kind::kParam));
  M3_RETURN_IF_ERROR(c.check("dt", a.dt, {d.B, d.H}, Kind::kParam));
  M3_RETURN_IF_ERROR(c.check("trap", a.trap, {d.B, d.H}, Kind::kActivation));
  M3_RETURN_IF_ERROR(c.check("angles", a.angles, {d.B, d.H, d.NA}, Kind::kParam));
  for (auto [name, t] : {std::pair{"q_bias", &a.q_bias}, std::pair{"k_bias", &a.k_bias}}) {
    if (t->defined() && d.R == 1 && t->ndim == 2) {
      d.bias_siso_layout = true;
      M3_RETURN_IF_ERROR(c.check(name, *t, {d.H, d.N}, Kind::kParam));
    } else {
      M3_RETURN_IF_ERROR(c.check(name, *t, {d.H, d.R, d.N}, Kind::kParam));
    }
  }
  M3_RETURN_IF_ERROR(c.check("d", a.d, {d.H}, Kind::kParam, false));
  M3_RETURN_IF_ERROR(c.check("z", a.z, {d.B, d.H, d.P}, Kind::kActivation, false));
  M3_RETURN_IF_ERROR(c.check("mimo_v", a.mimo_v, {d.H, d.R, d.P}, Kind::kParam, false));
  M3_RETURN_IF_ERROR(c.check("mimo_z", a.mimo_z, {d.H, d.R, d.P}, Kind::kParam, false));
  M3_RETURN_IF_ERROR(c.check("mimo_o", a.mimo_o, {d.H, d.R, d.P}, Kind::kParam, false));
  M3_RETURN_IF_ERROR(c.check("norm_weight", a.norm_weight, {d.H, d.P}, Kind::kParam, false));
  if (!a.state.all())
    return Status::InvalidArgument(
        "state: the decode step needs all four states (angle, ssm, k, v)");
  M3_RETURN_IF_ERROR(check_states("state", a.state, d, c, false, Kind::kParam));
  d.state_k_siso_layout = a.state.k.ndim == 3;
  if (!(a.norm_eps > 0.0f) || !std::isfinite(a.norm_eps))
    return Status::InvalidArgument("norm_eps: must be a positive finite number");
  d.per_rank_out = d.R > 1 && !a.mimo_o.defined();
  std::vector<int64_t> out_shape = d.per_rank_out ? std::vector<int64_t>{d.B, d.R, d.H, d.P}
                                                  : std::vector<int64_t>{d.B, d.H, d.P};
  M3_RETURN_IF_ERROR(c.check("out", a.out, out_shape, Kind::kOutput));
  M3_RETURN_IF_ERROR(check_lane_device(a.lane, d.device));
  M3_RETURN_IF_ERROR(check_finite("adt", a.adt));
  M3_RETURN_IF_ERROR(check_finite("dt", a.dt));
  M3_RETURN_IF_ERROR(check_finite("angles", a.angles));
  M3_RETURN_IF_ERROR(check_finite("trap", a.trap));
  *dims = d;
  return Status::Ok();
}

}  // namespace mamba3
