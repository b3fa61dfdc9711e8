// Public C++ API of the mamba3 kernel stack (DESIGN.md §2).
//
// Framework-free: plain structs of data pointers, shapes, int64 element strides, dtype and
// device. Every entry point validates its arguments and returns a Status whose message names
// the offending argument with the expected and actual value. Nothing here throws, prints,
// exits or aborts.
//
// Math names follow DESIGN.md: q = C, k = B, v = x. Dimension names:
//   B batch, L seqlen (total packed length with cu_seqlens), H heads, G groups of q/k heads,
//   P headdim of v/out, N state size (even), R MIMO rank (1 = SISO), NA rope angles per head,
//   S number of sequences (B, or len(cu_seqlens) - 1).
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace mamba3 {

// ---------------------------------------------------------------------------------------------
// Status

enum class StatusCode { kOk = 0, kInvalidArgument, kNotSupported, kInternal };

class Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status Ok() { return {}; }
  static Status InvalidArgument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
  static Status NotSupported(std::string m) { return {StatusCode::kNotSupported, std::move(m)}; }
  static Status Internal(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "ok", "invalid argument: ...", "not supported: ...", "internal: ...".
  std::string ToString() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// ---------------------------------------------------------------------------------------------
// Tensors: non-owning strided views.

enum class DType { kF32, kF64, kBF16, kF16, kI32 };
enum class Device { kCPU, kCUDA };

const char* dtype_name(DType dtype);
int64_t dtype_size(DType dtype);

inline constexpr int kMaxDims = 6;

struct Tensor {
  void* data = nullptr;   // may be null only when numel() == 0
  DType dtype = DType::kF32;
  Device device = Device::kCPU;
  int device_index = 0;
  int ndim = -1;          // -1: absent (optional argument not given)
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, not bytes

  bool defined() const { return ndim >= 0; }
  int64_t numel() const;
  bool is_contiguous() const;
  std::string shape_string() const;  // "(2, 130, 4, 16)" or "absent"
};

// A row-major contiguous view.
Tensor make_tensor(void* data, DType dtype, std::initializer_list<int64_t> shape,
                   Device device = Device::kCPU, int device_index = 0);
Tensor make_tensor(void* data, DType dtype, const std::vector<int64_t>& shape,
                   Device device = Device::kCPU, int device_index = 0);
// An explicitly strided view (strides in elements).
Tensor make_strided(void* data, DType dtype, const std::vector<int64_t>& shape,
                    const std::vector<int64_t>& strides, Device device = Device::kCPU,
                    int device_index = 0);

// ---------------------------------------------------------------------------------------------
// Arguments

enum class RopePairing {
  kInterleaved,  // pair i = (2i, 2i+1), official SISO
  kHalved,       // pair i = (i, i + N/2), official MIMO
};

enum class Lane {
  kAuto,       // cuda for CUDA tensors; reference for float64 inputs; cpu otherwise
  kReference,  // float64 token-by-token recurrence (the definition)
  kCpu,        // float32 chunked, multithreaded
  kCuda,       // sm_90a kernels
};
const char* lane_name(Lane lane);

// The four recurrent states of DESIGN.md §2.2. All four or none.
struct States {
  Tensor angle;  // (S, H, NA) fp32, cumulative rope angle (final: wrapped to [0, 2*pi))
  Tensor ssm;    // (S, H, P, N) fp32
  Tensor k;      // (S, R, H, N) fp32, rotated k of the last token; SISO also (S, H, N)
  Tensor v;      // (S, H, P) fp32, raw v (x) of the last token

  bool any() const { return angle.defined() || ssm.defined() || k.defined() || v.defined(); }
  bool all() const { return angle.defined() && ssm.defined() && k.defined() && v.defined(); }
};

// Inputs of the core op (DESIGN.md §2.1). Optional tensors are left absent (ndim = -1).
struct Inputs {
  Tensor q;        // (B, L, R, G, N); SISO also (B, L, G, N). C, already RMS-normed
  Tensor k;        // same shape as q. B, already RMS-normed
  Tensor v;        // (B, L, H, P). x
  Tensor adt;      // (B, H, L) fp32, A*dt, negative
  Tensor dt;       // (B, H, L) fp32, dt > 0
  Tensor trap;     // (B, H, L), pre-sigmoid trapezoid parameter
  Tensor q_bias;   // (H, R, N) fp32; SISO also (H, N)
  Tensor k_bias;   // (H, R, N) fp32; SISO also (H, N)
  Tensor angles;   // (B, L, H, NA) fp32, raw (theta advances by pi*tanh(angles)*dt)
  Tensor d;        // (H,) fp32, optional skip
  Tensor z;        // (B, L, H, P), optional gate
  Tensor mimo_v;   // (H, R, P) fp32, psi, optional (absent: 1)
  Tensor mimo_z;   // (H, R, P) fp32, zeta, optional (absent: 1)
  Tensor mimo_o;   // (H, R, P) fp32, phi, optional (absent: per-rank output)
  Tensor norm_weight;  // (H, P) fp32, optional fused output RMSNorm (per head, before the gate)
  States initial;  // optional, all four or none (absent: zero)
  Tensor cu_seqlens;   // (S + 1,) int32, optional packed sequences; requires B == 1

  RopePairing rope_pairing = RopePairing::kInterleaved;
  float norm_eps = 1e-5f;
  int chunk_size = 64;  // hint for chunked lanes; does not change results beyond rounding
};

struct ForwardArgs {
  Inputs in;
  // (B, L, H, P) when R == 1 or mimo_o is given; else (B, L, R, H, P). dtype of v by default;
  // any float dtype is accepted and is what the output is rounded to.
  Tensor out;
  States final_states;  // optional outputs, all four or none; shapes as Inputs::initial
  // Optional: activations saved for the backward, (saved_numel(args),) float32 on the inputs'
  // device. Lane-specific contents (cpu: chunk-start states and pre-gate y; cuda, where its
  // forward and backward take the tensor cores and MAMBA3_CUDA_SAVE_TILES is not 0: a header,
  // then per (chunk, head) the rotated q / k and v psi tiles, angles, scalars, the chunk-start
  // state and decay, about 1.3 KB per token per head at N = 128, P = 64; reference: empty, its
  // backward recomputes; the cuda lane also accepts an empty buffer and then saves nothing);
  // hand the same buffer to BackwardArgs::saved with the same inputs to skip the backward's
  // recomputation.
  Tensor saved;
  Lane lane = Lane::kAuto;
  int num_threads = 0;  // cpu lane: 0 = all available
  void* stream = nullptr;  // cuda lane: the cudaStream_t to launch on (null: default stream)
};

// Gradients. Each is optional: a defined tensor is written, an absent one is skipped. A
// gradient for an input that is absent is an error. Shapes equal their input's.
struct Grads {
  Tensor q, k, v, adt, dt, trap, q_bias, k_bias, angles, d, z, mimo_v, mimo_z, mimo_o,
      norm_weight;
  States initial;  // any subset of the four
};

struct BackwardArgs {
  Inputs in;
  Tensor d_out;      // cotangent of out, same shape as ForwardArgs::out
  States d_final;    // optional cotangents of the final states (any subset; absent = 0)
  Grads grads;
  // Optional: ForwardArgs::saved of a forward on the same inputs and lane. Absent: the backward
  // recomputes what it needs. Its size and header are checked against the inputs' dimensions
  // (cuda: the size on the host; the header on the device, where a mismatch prints the word
  // and aborts the kernel, leaving the CUDA context unusable); its values are trusted to come
  // from that forward.
  Tensor saved;
  Lane lane = Lane::kAuto;
  int num_threads = 0;
  void* stream = nullptr;  // cuda lane: the cudaStream_t to launch on (null: default stream)
};

// One decode token for a batch of sequences; `state` is read and updated in place.
struct StepArgs {
  Tensor q;        // (B, R, G, N); SISO also (B, G, N)
  Tensor k;        // same shape as q
  Tensor v;        // (B, H, P)
  Tensor adt;      // (B, H) fp32
  Tensor dt;       // (B, H) fp32
  Tensor trap;     // (B, H)
  Tensor angles;   // (B, H, NA) fp32
  Tensor q_bias, k_bias, d, mimo_v, mimo_z, mimo_o, norm_weight;  // as Inputs
  Tensor z;        // (B, H, P), optional
  States state;    // required, all four, S == B; updated in place
  Tensor out;      // (B, H, P) or (B, R, H, P) (R > 1 and mimo_o absent)
  RopePairing rope_pairing = RopePairing::kInterleaved;
  float norm_eps = 1e-5f;
  Lane lane = Lane::kAuto;
  // cuda lane: the cudaStream_t to launch on (null: default stream). The step allocates
  // nothing and never synchronizes, so it can be captured in a CUDA graph.
  void* stream = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Entry points

// Validation only: everything forward() would check, without computing.
Status validate(const ForwardArgs& args);
Status validate(const BackwardArgs& args);
Status validate(const StepArgs& args);

Status forward(const ForwardArgs& args);
Status backward(const BackwardArgs& args);
Status step(const StepArgs& args);

// Number of float32 elements of ForwardArgs::saved for these arguments on the lane they resolve
// to (0 when the lane saves nothing: reference; cuda off its tensor-core path or with
// MAMBA3_CUDA_SAVE_TILES=0). Validates the arguments (saved itself aside); on the cuda lane it
// depends on the tensors' alignment and queries the device.
Status saved_numel(const ForwardArgs& args, int64_t* numel);

// The cuda lane keeps the workspace memory of its forward and backward calls in a pool of its
// own (one per device) for the next call, as PyTorch's caching allocator does. This returns the
// pools' unused memory to the driver; `released_bytes` (may be null) gets how much that was.
// A no-op returning Ok when the build has no cuda lane or no call has used it.
Status release_cached_memory(size_t* released_bytes = nullptr);

// ---------------------------------------------------------------------------------------------
// Build and runtime information (used by `mamba3 info`).

struct GateInfo {
  std::string env_var;      // e.g. "MAMBA3_PSIV_CACHE"
  std::string description;
  bool set;                 // the gated path is on now (from the environment; default-on
                            // gates are on while unset)
  std::string implemented;  // where this build implements it, e.g. "none"
};

struct LaneInfo {
  std::string name;
  bool compiled;
  bool available;  // compiled and usable now (e.g. a GPU is present)
  std::string detail;
};

const char* version();
std::vector<LaneInfo> lanes();
std::vector<GateInfo> gates();
std::string build_options();  // one "key=value" per line

}  // namespace mamba3
