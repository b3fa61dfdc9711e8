// torch.library bindings of the mamba3 core (DESIGN.md §2): schemas, and the CPU/CUDA kernels
// that turn torch tensors into the core's strided views and a failed Status into a RuntimeError.
//
// Fake (meta) kernels and autograd live in python/mamba3/_ops.py; the schemas name that module
// (set_python_module) so loading this library alone still finds them.
//
// Ops (namespace mamba3):
//   fwd   prefill forward. Returns (out, final_angle, final_ssm, final_k, final_v, saved); the
//         final states are 0-element tensors unless return_final_states, `saved` is the lane's
//         activation buffer for bwd (0 elements when the lane saves nothing or save is false).
//   bwd   gradients of every input of fwd; a gradient that grad_mask does not ask for, or whose
//         input is absent, comes back as a 0-element tensor.
//   step  one decode token; mutates the four states and writes `out` (allocates nothing).
//         Not differentiable (decode is inference): its output carries no autograd history.
//
// Devices: every tensor of a call must be on one device (checked by name here, index included).
// CUDA tensors are passed to the core as device pointers, with the device made current and
// torch's current stream of that device as the launch stream, so the ops follow torch's stream
// semantics (and are capturable in a CUDA graph where the lane is). A build without the cuda
// lane answers CUDA tensors with the core's "not supported".
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "mamba3/mamba3.h"

#ifdef MAMBA3_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mamba3_torch {
namespace {

using OptTensor = std::optional<at::Tensor>;

mamba3::DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return mamba3::DType::kF32;
    case at::kDouble:
      return mamba3::DType::kF64;
    case at::kBFloat16:
      return mamba3::DType::kBF16;
    case at::kHalf:
      return mamba3::DType::kF16;
    case at::kInt:
      return mamba3::DType::kI32;
    default:
      break;
  }
  TORCH_CHECK(false, name, ": unsupported dtype ", t.scalar_type(),
              " (expected float32, float64, bfloat16, float16, or int32 for cu_seqlens)");
}

// The one device of a call: the first tensor bound sets it, every later one must match it.
struct CallDevice {
  std::optional<c10::Device> device;
  const char* first = nullptr;

  void check(const at::Tensor& t, const char* name) {
    if (!device) {
      device = t.device();
      first = name;
      return;
    }
    TORCH_CHECK(t.device() == *device, name, ": expected device ", *device, " (the device of ",
                first, "), got ", t.device(), "; all tensors of one call must be on one device");
  }
};

// A non-owning strided view of a torch tensor (no copy: any strides, including 0).
mamba3::Tensor view(const at::Tensor& t, const char* name, CallDevice& dev) {
  mamba3::Tensor v;
  if (!t.defined()) return v;
  dev.check(t, name);
  TORCH_CHECK(t.dim() <= mamba3::kMaxDims, name, ": at most ", mamba3::kMaxDims,
              " dims are supported, got ", t.dim());
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), name,
              ": expected a cpu or cuda tensor, got device ", t.device());
  v.data = t.numel() > 0 ? t.data_ptr() : nullptr;
  v.dtype = to_dtype(t, name);
  v.device = t.device().is_cuda() ? mamba3::Device::kCUDA : mamba3::Device::kCPU;
  v.device_index = t.device().has_index() ? t.device().index() : 0;
  v.ndim = static_cast<int>(t.dim());
  for (int64_t d = 0; d < t.dim(); ++d) {
    v.shape[d] = t.size(d);
    v.strides[d] = t.stride(d);
  }
  return v;
}

mamba3::Tensor view(const OptTensor& t, const char* name, CallDevice& dev) {
  return t.has_value() ? view(*t, name, dev) : mamba3::Tensor{};
}

// Makes the call's CUDA device current for the scope and returns torch's current stream on it
// (null for CPU tensors, whose lanes take no stream).
class DeviceScope {
 public:
  explicit DeviceScope(const CallDevice& dev) {
#ifdef MAMBA3_WITH_CUDA
    if (dev.device && dev.device->is_cuda()) {
      guard_.emplace(*dev.device);
      stream_ = static_cast<void*>(c10::cuda::getCurrentCUDAStream(dev.device->index()).stream());
    }
#else
    (void)dev;
#endif
  }
  void* stream() const { return stream_; }

 private:
#ifdef MAMBA3_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard_;
#endif
  void* stream_ = nullptr;
};

void check_status(const mamba3::Status& st, const char* op) {
  TORCH_CHECK(st.ok(), "mamba3::", op, ": ", st.ToString());
}

void check_rank(const at::Tensor& t, const char* name, std::initializer_list<int64_t> ranks,
                const char* layout) {
  for (int64_t r : ranks)
    if (t.dim() == r) return;
  TORCH_CHECK(false, name, ": expected ", layout, ", got ", t.dim(), " dims ", t.sizes());
}

// The inputs shared by fwd and bwd, in schema order.
struct InputTensors {
  const at::Tensor &q, &k, &v, &adt, &dt, &trap, &q_bias, &k_bias, &angles;
  const OptTensor &d, &z, &mimo_v, &mimo_z, &mimo_o, &norm_weight;
  const OptTensor &init_angle, &init_ssm, &init_k, &init_v, &cu_seqlens;
};

mamba3::Inputs make_inputs(const InputTensors& t, bool halved_rope, double norm_eps,
                           int64_t chunk_size, CallDevice& dev) {
  mamba3::Inputs in;
  in.q = view(t.q, "q", dev);
  in.k = view(t.k, "k", dev);
  in.v = view(t.v, "v", dev);
  in.adt = view(t.adt, "adt", dev);
  in.dt = view(t.dt, "dt", dev);
  in.trap = view(t.trap, "trap", dev);
  in.q_bias = view(t.q_bias, "q_bias", dev);
  in.k_bias = view(t.k_bias, "k_bias", dev);
  in.angles = view(t.angles, "angles", dev);
  in.d = view(t.d, "d", dev);
  in.z = view(t.z, "z", dev);
  in.mimo_v = view(t.mimo_v, "mimo_v", dev);
  in.mimo_z = view(t.mimo_z, "mimo_z", dev);
  in.mimo_o = view(t.mimo_o, "mimo_o", dev);
  in.norm_weight = view(t.norm_weight, "norm_weight", dev);
  in.initial.angle = view(t.init_angle, "initial.angle", dev);
  in.initial.ssm = view(t.init_ssm, "initial.ssm", dev);
  in.initial.k = view(t.init_k, "initial.k", dev);
  in.initial.v = view(t.init_v, "initial.v", dev);
  in.cu_seqlens = view(t.cu_seqlens, "cu_seqlens", dev);
  in.rope_pairing = halved_rope ? mamba3::RopePairing::kHalved : mamba3::RopePairing::kInterleaved;
  in.norm_eps = static_cast<float>(norm_eps);
  TORCH_CHECK(chunk_size >= 1 && chunk_size <= (1 << 20), "chunk_size: must be in [1, 2^20], got ",
              chunk_size);
  in.chunk_size = static_cast<int>(chunk_size);
  return in;
}

// Output and state shapes from the inputs (the core validates everything else).
struct Shapes {
  int64_t B, L, R, G, N, H, P, NA, S;
  bool qk_siso, per_rank;
  at::ScalarType state_dtype;
};

Shapes shapes_of(const InputTensors& t) {
  check_rank(t.q, "q", {4, 5}, "(B, L, R, G, N) or (B, L, G, N)");
  check_rank(t.v, "v", {4}, "(B, L, H, P)");
  check_rank(t.angles, "angles", {4}, "(B, L, H, NA)");
  Shapes s{};
  s.qk_siso = t.q.dim() == 4;
  s.B = t.q.size(0);
  s.L = t.q.size(1);
  s.R = s.qk_siso ? 1 : t.q.size(2);
  s.G = t.q.size(-2);
  s.N = t.q.size(-1);
  s.H = t.v.size(2);
  s.P = t.v.size(3);
  s.NA = t.angles.size(3);
  if (t.cu_seqlens.has_value()) {
    check_rank(*t.cu_seqlens, "cu_seqlens", {1}, "(S + 1,)");
    s.S = t.cu_seqlens->size(0) - 1;
  } else {
    s.S = s.B;
  }
  s.per_rank = s.R > 1 && !t.mimo_o.has_value();
  s.state_dtype = t.v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& adt,
    const at::Tensor& dt, const at::Tensor& trap, const at::Tensor& q_bias,
    const at::Tensor& k_bias, const at::Tensor& angles, const OptTensor& d, const OptTensor& z,
    const OptTensor& mimo_v, const OptTensor& mimo_z, const OptTensor& mimo_o,
    const OptTensor& norm_weight, const OptTensor& init_angle, const OptTensor& init_ssm,
    const OptTensor& init_k, const OptTensor& init_v, const OptTensor& cu_seqlens, bool halved_rope,
    double norm_eps, int64_t chunk_size, bool return_final_states, bool save_for_backward,
    std::optional<at::ScalarType> out_dtype) {
  const InputTensors t{q,           k,          v,        adt,    dt,     trap,      q_bias,
                       k_bias,      angles,     d,        z,      mimo_v, mimo_z,    mimo_o,
                       norm_weight, init_angle, init_ssm, init_k, init_v, cu_seqlens};
  const Shapes s = shapes_of(t);
  CallDevice dev;
  mamba3::ForwardArgs args;
  args.in = make_inputs(t, halved_rope, norm_eps, chunk_size, dev);
  args.num_threads = at::get_num_threads();
  const DeviceScope scope(dev);
  args.stream = scope.stream();

  const auto opts = v.options();
  const auto out_opts = opts.dtype(out_dtype.value_or(v.scalar_type()));
  at::Tensor out = s.per_rank ? at::empty({s.B, s.L, s.R, s.H, s.P}, out_opts)
                              : at::empty({s.B, s.L, s.H, s.P}, out_opts);
  args.out = view(out, "out", dev);

  const auto sopts = opts.dtype(s.state_dtype);
  at::Tensor f_angle, f_ssm, f_k, f_v;
  if (return_final_states) {
    f_angle = at::empty({s.S, s.H, s.NA}, sopts);
    f_ssm = at::empty({s.S, s.H, s.P, s.N}, sopts);
    f_k = s.qk_siso ? at::empty({s.S, s.H, s.N}, sopts) : at::empty({s.S, s.R, s.H, s.N}, sopts);
    f_v = at::empty({s.S, s.H, s.P}, sopts);
    args.final_states = {view(f_angle, "final.angle", dev), view(f_ssm, "final.ssm", dev),
                         view(f_k, "final.k", dev), view(f_v, "final.v", dev)};
  } else {
    f_angle = at::empty({0}, sopts);
    f_ssm = at::empty({0}, sopts);
    f_k = at::empty({0}, sopts);
    f_v = at::empty({0}, sopts);
  }

  int64_t saved_numel = 0;
  if (save_for_backward) {
    const mamba3::Status st = mamba3::saved_numel(args, &saved_numel);
    // A lane that cannot say (a build without the cuda lane) answers "not supported": then
    // nothing is saved (0 elements) and bwd recomputes what it needs from the inputs. The
    // buffer is never handed over unfilled. Any other failure is the forward's own error.
    if (st.code() == mamba3::StatusCode::kNotSupported && v.is_cuda())
      saved_numel = 0;
    else
      check_status(st, "fwd");
  }
  at::Tensor saved = at::empty({saved_numel}, opts.dtype(at::kFloat));
  if (saved_numel > 0) args.saved = view(saved, "saved", dev);

  check_status(mamba3::forward(args), "fwd");
  return {out, f_angle, f_ssm, f_k, f_v, saved};
}

constexpr int kNumGrads = 19;  // q .. norm_weight (15), the four initial states

std::vector<at::Tensor> bwd(const at::Tensor& d_out, const OptTensor& d_final_angle,
                            const OptTensor& d_final_ssm, const OptTensor& d_final_k,
                            const OptTensor& d_final_v, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& adt, const at::Tensor& dt,
                            const at::Tensor& trap, const at::Tensor& q_bias,
                            const at::Tensor& k_bias, const at::Tensor& angles, const OptTensor& d,
                            const OptTensor& z, const OptTensor& mimo_v, const OptTensor& mimo_z,
                            const OptTensor& mimo_o, const OptTensor& norm_weight,
                            const OptTensor& init_angle, const OptTensor& init_ssm,
                            const OptTensor& init_k, const OptTensor& init_v,
                            const OptTensor& cu_seqlens, const OptTensor& saved, bool halved_rope,
                            double norm_eps, int64_t chunk_size, at::IntArrayRef grad_mask_ints) {
  const InputTensors t{q,           k,          v,        adt,    dt,     trap,      q_bias,
                       k_bias,      angles,     d,        z,      mimo_v, mimo_z,    mimo_o,
                       norm_weight, init_angle, init_ssm, init_k, init_v, cu_seqlens};
  TORCH_CHECK(static_cast<int64_t>(grad_mask_ints.size()) == kNumGrads, "grad_mask: expected ",
              kNumGrads, " entries, got ", grad_mask_ints.size());
  CallDevice dev;
  mamba3::BackwardArgs args;
  args.in = make_inputs(t, halved_rope, norm_eps, chunk_size, dev);
  args.num_threads = at::get_num_threads();
  args.d_out = view(d_out, "d_out", dev);
  args.d_final = {view(d_final_angle, "d_final.angle", dev), view(d_final_ssm, "d_final.ssm", dev),
                  view(d_final_k, "d_final.k", dev), view(d_final_v, "d_final.v", dev)};
  if (saved.has_value() && saved->numel() > 0) args.saved = view(*saved, "saved", dev);
  const DeviceScope scope(dev);
  args.stream = scope.stream();

  const std::array<const at::Tensor*, kNumGrads> inputs = {&q,
                                                           &k,
                                                           &v,
                                                           &adt,
                                                           &dt,
                                                           &trap,
                                                           &q_bias,
                                                           &k_bias,
                                                           &angles,
                                                           d ? &*d : nullptr,
                                                           z ? &*z : nullptr,
                                                           mimo_v ? &*mimo_v : nullptr,
                                                           mimo_z ? &*mimo_z : nullptr,
                                                           mimo_o ? &*mimo_o : nullptr,
                                                           norm_weight ? &*norm_weight : nullptr,
                                                           init_angle ? &*init_angle : nullptr,
                                                           init_ssm ? &*init_ssm : nullptr,
                                                           init_k ? &*init_k : nullptr,
                                                           init_v ? &*init_v : nullptr};
  std::array<mamba3::Tensor*, kNumGrads> slots = {
      &args.grads.q,           &args.grads.k,
      &args.grads.v,           &args.grads.adt,
      &args.grads.dt,          &args.grads.trap,
      &args.grads.q_bias,      &args.grads.k_bias,
      &args.grads.angles,      &args.grads.d,
      &args.grads.z,           &args.grads.mimo_v,
      &args.grads.mimo_z,      &args.grads.mimo_o,
      &args.grads.norm_weight, &args.grads.initial.angle,
      &args.grads.initial.ssm, &args.grads.initial.k,
      &args.grads.initial.v};
  static constexpr std::array<const char*, kNumGrads> names = {
      "grads.q",           "grads.k",         "grads.v",           "grads.adt",
      "grads.dt",          "grads.trap",      "grads.q_bias",      "grads.k_bias",
      "grads.angles",      "grads.d",         "grads.z",           "grads.mimo_v",
      "grads.mimo_z",      "grads.mimo_o",    "grads.norm_weight", "grads.initial.angle",
      "grads.initial.ssm", "grads.initial.k", "grads.initial.v"};

  std::vector<at::Tensor> grads(kNumGrads);
  for (int i = 0; i < kNumGrads; ++i) {
    const at::Tensor* in = inputs[static_cast<size_t>(i)];
    if (in != nullptr && grad_mask_ints[static_cast<size_t>(i)] != 0) {
      // Contiguous, whatever the input's strides (an expanded input gets a full gradient).
      grads[static_cast<size_t>(i)] = at::empty(in->sizes(), in->options());
      *slots[static_cast<size_t>(i)] =
          view(grads[static_cast<size_t>(i)], names[static_cast<size_t>(i)], dev);
    } else {
      grads[static_cast<size_t>(i)] = at::empty({0}, (in ? *in : v).options());
    }
  }
  check_status(mamba3::backward(args), "bwd");
  return grads;
}

void step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& adt,
          const at::Tensor& dt, const at::Tensor& trap, const at::Tensor& angles,
          const at::Tensor& q_bias, const at::Tensor& k_bias, const OptTensor& d,
          const OptTensor& z, const OptTensor& mimo_v, const OptTensor& mimo_z,
          const OptTensor& mimo_o, const OptTensor& norm_weight, const at::Tensor& state_angle,
          const at::Tensor& state_ssm, const at::Tensor& state_k, const at::Tensor& state_v,
          const at::Tensor& out, bool halved_rope, double norm_eps) {
  CallDevice dev;
  mamba3::StepArgs a;
  a.q = view(q, "q", dev);
  a.k = view(k, "k", dev);
  a.v = view(v, "v", dev);
  a.adt = view(adt, "adt", dev);
  a.dt = view(dt, "dt", dev);
  a.trap = view(trap, "trap", dev);
  a.angles = view(angles, "angles", dev);
  a.q_bias = view(q_bias, "q_bias", dev);
  a.k_bias = view(k_bias, "k_bias", dev);
  a.d = view(d, "d", dev);
  a.z = view(z, "z", dev);
  a.mimo_v = view(mimo_v, "mimo_v", dev);
  a.mimo_z = view(mimo_z, "mimo_z", dev);
  a.mimo_o = view(mimo_o, "mimo_o", dev);
  a.norm_weight = view(norm_weight, "norm_weight", dev);
  a.state = {view(state_angle, "state.angle", dev), view(state_ssm, "state.ssm", dev),
             view(state_k, "state.k", dev), view(state_v, "state.v", dev)};
  a.out = view(out, "out", dev);
  a.rope_pairing = halved_rope ? mamba3::RopePairing::kHalved : mamba3::RopePairing::kInterleaved;
  a.norm_eps = static_cast<float>(norm_eps);
  const DeviceScope scope(dev);
  a.stream = scope.stream();
  check_status(mamba3::step(a), "step");
}

// The bytes of cached workspace the cuda lane returned to the driver (mamba3.h).
int64_t release_cached_memory() {
  size_t n = 0;
  check_status(mamba3::release_cached_memory(&n), "release_cached_memory");
  return static_cast<int64_t>(n);
}

}  // namespace
}  // namespace mamba3_torch

TORCH_LIBRARY(mamba3, m) {
  m.set_python_module("mamba3._ops");
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor adt, Tensor dt, Tensor trap, Tensor q_bias, "
      "Tensor k_bias, Tensor angles, Tensor? d, Tensor? z, Tensor? mimo_v, Tensor? mimo_z, "
      "Tensor? mimo_o, Tensor? norm_weight, Tensor? init_angle, Tensor? init_ssm, "
      "Tensor? init_k, Tensor? init_v, Tensor? cu_seqlens, bool halved_rope, float norm_eps, "
      "int chunk_size, bool return_final_states, bool save_for_backward, "
      "ScalarType? out_dtype=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bwd(Tensor d_out, Tensor? d_final_angle, Tensor? d_final_ssm, Tensor? d_final_k, "
      "Tensor? d_final_v, Tensor q, Tensor k, Tensor v, Tensor adt, Tensor dt, Tensor trap, "
      "Tensor q_bias, Tensor k_bias, Tensor angles, Tensor? d, Tensor? z, Tensor? mimo_v, "
      "Tensor? mimo_z, Tensor? mimo_o, Tensor? norm_weight, Tensor? init_angle, "
      "Tensor? init_ssm, Tensor? init_k, Tensor? init_v, Tensor? cu_seqlens, Tensor? saved, "
      "bool halved_rope, float norm_eps, int chunk_size, int[] grad_mask) -> Tensor[]");
  m.def(
      "step(Tensor q, Tensor k, Tensor v, Tensor adt, Tensor dt, Tensor trap, Tensor angles, "
      "Tensor q_bias, Tensor k_bias, Tensor? d, Tensor? z, Tensor? mimo_v, Tensor? mimo_z, "
      "Tensor? mimo_o, Tensor? norm_weight, Tensor(a!) state_angle, Tensor(b!) state_ssm, "
      "Tensor(c!) state_k, Tensor(d!) state_v, Tensor(e!) out, bool halved_rope, "
      "float norm_eps) -> ()");
  // No tensor arguments: one kernel for every dispatch key.
  m.def("release_cached_memory() -> int", &mamba3_torch::release_cached_memory);
}

// One implementation for both devices: the core picks the lane from the tensors' device (the
// CUDA lane of a build without it answers "not supported").
TORCH_LIBRARY_IMPL(mamba3, CPU, m) {
  m.impl("fwd", &mamba3_torch::fwd);
  m.impl("bwd", &mamba3_torch::bwd);
  m.impl("step", &mamba3_torch::step);
}

TORCH_LIBRARY_IMPL(mamba3, CUDA, m) {
  m.impl("fwd", &mamba3_torch::fwd);
  m.impl("bwd", &mamba3_torch::bwd);
  m.impl("step", &mamba3_torch::step);
}
