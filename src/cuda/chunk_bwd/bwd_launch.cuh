// Host side of the chunked backward: configuration check, chunk size from the shared-memory
// budget, the workspace and the launch sequence (bwd_kernels.cuh). Compiled by nvcc in
// bwd_dispatch.cu, and as plain C++ by the CPU emulation test (MAMBA3_CUDA_EMU, tests/emu), which
// runs the same kernels with one host thread per CUDA thread.
//
// Workspace: one stream-ordered allocation (workspace_alloc / cudaFreeAsync on the call's
// stream), so the call stays asynchronous and capturable; the lane's pool keeps the freed memory
// for the next call (cuda/common/workspace.h), nothing else is kept between calls. With the
// forward's saved buffer (BackwardArgs::saved, cuda/common/tile_record.cuh: the tile records,
// chunk-start states and decays the tensor-core forward wrote) the backward skips its loader
// pass (chunk_state_tc), the state scan and the angle scans, and chunk_out reads the saved y
// instead of recomputing it; without it, it recomputes them.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/return_if_error.h"
#include "core/validate.h"
#include "cuda/chunk_bwd/bwd_tc_out.cuh"
#include "cuda/common/launch.cuh"

#ifndef MAMBA3_CUDA_EMU
#include "cuda/common/check.cuh"
#include "cuda/common/workspace.h"
#endif

namespace mamba3::cuda::bwd {

#ifdef MAMBA3_CUDA_EMU
#define M3B_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::m3emu::launch(kernel, dim3 grid, dim3 block, smem, __VA_ARGS__)
#define M3B_CHECK(expr) (void)0
#define M3B_CHECK_LAUNCH(name) (void)0
#else
#define M3B_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<dim3 grid, dim3 block, smem, stream>>>(__VA_ARGS__)
#define M3B_CHECK(expr) MAMBA3_CHECK_CUDA(expr)
#define M3B_CHECK_LAUNCH(name) MAMBA3_CHECK_LAUNCH(name)
#endif

// The largest dynamic shared memory a block may opt into on the current device.
inline Status max_dynamic_smem(int* bytes) {
#ifdef MAMBA3_CUDA_EMU
  *bytes = 232448;  // sm_90
#else
  int dev = 0;
  M3B_CHECK(cudaGetDevice(&dev));
  M3B_CHECK(cudaDeviceGetAttribute(bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
#endif
  return Status::Ok();
}

// The workspace of one call, released (stream-ordered) when it goes out of scope.
class WorkspaceBuffer {
 public:
  explicit WorkspaceBuffer(cudaStream_t stream) : stream_(stream) {}
  ~WorkspaceBuffer() {
#ifdef MAMBA3_CUDA_EMU
    std::free(base_);
#else
    if (base_) cudaFreeAsync(base_, stream_);
#endif
  }
  WorkspaceBuffer(const WorkspaceBuffer&) = delete;
  WorkspaceBuffer& operator=(const WorkspaceBuffer&) = delete;

  // Reserves `count` elements of T (256-byte aligned); pointers are valid after allocate().
  template <typename T>
  void reserve(T** slot, int64_t count) {
    slots_[n_slots_] = {reinterpret_cast<void**>(slot), bytes_};
    ++n_slots_;
    bytes_ += (static_cast<size_t>(count) * sizeof(T) + 255) / 256 * 256;
  }
  Status allocate() {
    if (bytes_ == 0) return Status::Ok();
#ifdef MAMBA3_CUDA_EMU
    base_ = std::malloc(bytes_);
    std::memset(base_, 0xff, bytes_);  // NaN everywhere: an unwritten read shows up
#else
    M3B_CHECK(workspace_alloc(&base_, bytes_, stream_));
#endif
    for (int i = 0; i < n_slots_; ++i) *slots_[i].slot = static_cast<char*>(base_) + slots_[i].offset;
    return Status::Ok();
  }
  size_t bytes() const { return bytes_; }

 private:
  struct Slot {
    void** slot;
    size_t offset;
  };
  cudaStream_t stream_;
  void* base_ = nullptr;
  size_t bytes_ = 0;
  Slot slots_[24] = {};
  int n_slots_ = 0;
};

// Chunk rows whose three chunk-kernel layouts fit `smem_limit` bytes (0: none fits).
inline int pick_rows(const Dims& d, int smem_limit, BwdSmem* l3, BwdSmem* l5, BwdSmem* l7) {
  const int N = static_cast<int>(d.N), P = static_cast<int>(d.P), R = static_cast<int>(d.R);
  const int NA = static_cast<int>(d.NA);
  for (int rows = kMaxRows; rows >= R && rows >= 8; rows /= 2) {
    *l3 = bwd_smem_layout(N, P, R, NA, rows, kPartK | kPartV | kPartTL | kPartTH);
    *l5 = bwd_smem_layout(N, P, R, NA, rows,
                          kPartQ | kPartK | kPartV | kPartDY | kPartRA | kPartTL | kPartTH |
                              kPartGO | kPartZ);
    *l7 = bwd_smem_layout(N, P, R, NA, rows,
                          kPartQ | kPartK | kPartV | kPartDY | kPartRA | kPartDA | kPartST |
                              kPartTL | kPartTH | kPartDTH);
    const size_t need = smem_bytes(*l7) > smem_bytes(*l5) ? smem_bytes(*l7) : smem_bytes(*l5);
    if (need <= static_cast<size_t>(smem_limit)) return rows;
  }
  return 0;
}

// What the backward kernels serve; NotSupported names the value otherwise.
inline Status check_backward_supported(const Dims& d) {
  if (!(d.R == 1 || d.R == 2 || d.R == 4 || d.R == 8) || d.N > 128 || d.P > 128 || d.NA > 64)
    return Status::NotSupported("cuda lane backward: N = " + std::to_string(d.N) +
                                ", P = " + std::to_string(d.P) + ", R = " + std::to_string(d.R) +
                                ", NA = " + std::to_string(d.NA) +
                                " not supported (needs N <= 128, P <= 128, R in {1, 2, 4, 8}, "
                                "NA <= 64); the cpu lane runs it");
  return Status::Ok();
}

// MIMO (R > 1) takes the tensor-core backward unless MAMBA3_CUDA_BWD_MIMO_TC=0 (an opt-out to
// the fp32 SIMT kernels). It was opt-in while its angle gradient was 1.7e-2 from float64 on the
// H200 (2026-11-29, peers parity case B=2 L=512 H=8 N=128 P=64 R=4, bf16): the angle carry then
// summed every later token's bf16 rotation gradient; it now comes from the fp32 states at the
// chunk boundaries (bwd_angle_boundary_kernel) and chunk_grad splits the states it multiplies
// in two bf16 terms (emulated, B=1 H=1 L=512: 1.8e-2 -> 3.7e-3).
// Unset, empty or 1: on; 0: off; anything else is an error naming the variable.
inline Status mimo_tensor_core_gate(bool* on) { return default_on_gate("MAMBA3_CUDA_BWD_MIMO_TC", on); }

// The tensor-core chunk kernels (bwd_tc.cuh) serve bf16 q, k, v with 16-byte aligned contiguous
// rows (the forward's rule, CoreParams::tc_vec) at N, P in {64, 128}, SISO and MIMO with R a power
// of two (MIMO unless MAMBA3_CUDA_BWD_MIMO_TC=0, see above); everything else takes the fp32 SIMT
// kernels.
inline bool tensor_core_inputs(const BackwardArgs& a, const Dims& d, const CoreParams& p,
                               bool mimo_tc) {
  const Inputs& in = a.in;
  return in.q.dtype == DType::kBF16 && in.k.dtype == DType::kBF16 && in.v.dtype == DType::kBF16 &&
         p.tc_vec && (d.N == 64 || d.N == 128) && (d.P == 64 || d.P == 128) &&
         is_pow2(static_cast<int>(d.R)) && (d.R == 1 || mimo_tc);
}

// Chunk rows of the tensor-core kernels: 64 (kMaxRows; chunk_grad_tc's warp tiling assumes it)
// where the three layouts fit `smem_limit`, else 0 (the SIMT kernels).
inline int pick_rows_tc(const Dims& d, int smem_limit) {
  const int N = static_cast<int>(d.N), P = static_cast<int>(d.P), R = static_cast<int>(d.R);
  const int NA = static_cast<int>(d.NA), rows = kMaxRows;
  const int need = std::max({tc_layout(kTcGrad, N, P, R, NA, rows).bytes,
                             tc_layout(kTcOut, N, P, R, NA, rows).bytes,
                             tc_layout(kTcState, N, P, R, NA, rows).bytes});
  return need <= smem_limit ? rows : 0;
}

// chunk_grad_tc's instance for (N, P) in {64, 128}^2 and R in {1, 2, 4, 8} (tensor_core_inputs).
using GradTcKernel = void (*)(BwdParams, TcSmem);
template <int kN, int kP>
inline GradTcKernel grad_tc_kernel_r(int R) {
  switch (R) {
    case 1: return bwd_chunk_grad_tc_kernel<kN, kP, 1>;
    case 2: return bwd_chunk_grad_tc_kernel<kN, kP, 2>;
    case 4: return bwd_chunk_grad_tc_kernel<kN, kP, 4>;
    default: return bwd_chunk_grad_tc_kernel<kN, kP, 8>;
  }
}
inline GradTcKernel grad_tc_kernel(int N, int P, int R) {
  if (N == 64) return P == 64 ? grad_tc_kernel_r<64, 64>(R) : grad_tc_kernel_r<64, 128>(R);
  return P == 64 ? grad_tc_kernel_r<128, 64>(R) : grad_tc_kernel_r<128, 128>(R);
}

inline BwdParams make_bwd_params(const BackwardArgs& a, const Dims& d) {
  BwdParams bp;
  ForwardArgs f;
  f.in = a.in;
  bp.p = make_params(f, d);
  bp.d_out = to_device_view(a.d_out);
  bp.df_angle = to_device_view(a.d_final.angle), bp.df_ssm = to_device_view(a.d_final.ssm);
  bp.df_k = to_device_view(a.d_final.k), bp.df_v = to_device_view(a.d_final.v);
  const Grads& g = a.grads;
  bp.g_q = to_device_view(g.q), bp.g_k = to_device_view(g.k), bp.g_v = to_device_view(g.v);
  bp.g_adt = to_device_view(g.adt), bp.g_dt = to_device_view(g.dt);
  bp.g_trap = to_device_view(g.trap), bp.g_qb = to_device_view(g.q_bias);
  bp.g_kb = to_device_view(g.k_bias), bp.g_angles = to_device_view(g.angles);
  bp.g_d = to_device_view(g.d), bp.g_z = to_device_view(g.z), bp.g_psi = to_device_view(g.mimo_v);
  bp.g_zeta = to_device_view(g.mimo_z), bp.g_phi = to_device_view(g.mimo_o);
  bp.g_w = to_device_view(g.norm_weight);
  bp.gi_angle = to_device_view(g.initial.angle), bp.gi_ssm = to_device_view(g.initial.ssm);
  bp.gi_k = to_device_view(g.initial.k), bp.gi_v = to_device_view(g.initial.v);
  bp.L_tot = d.B * d.L;
  bp.pf = par_fields(static_cast<int>(d.R), static_cast<int>(d.P), static_cast<int>(d.N));
  return bp;
}

// Chunk rows and kernel family of a call: the tensor-core kernels where tensor_core_inputs and
// pick_rows_tc allow, else the SIMT kernels at pick_rows (0 rows: nothing fits).
inline int pick_backward_rows(const BackwardArgs& a, const Dims& d, const CoreParams& p,
                              int smem_limit, bool mimo_tc, bool* tc) {
  *tc = false;
  if (tensor_core_inputs(a, d, p, mimo_tc)) {
    const int rows = pick_rows_tc(d, smem_limit);
    if (rows > 0) {
      *tc = true;
      return rows;
    }
  }
  BwdSmem l3, l5, l7;
  return pick_rows(d, smem_limit, &l3, &l5, &l7);
}

// Whether backward_chunked runs the tensor-core chunk kernels for these arguments (tests).
inline bool backward_uses_tensor_cores(const BackwardArgs& a, const Dims& d) {
  if (!check_backward_supported(d).ok()) return false;
  int smem_limit = 0;
  if (!max_dynamic_smem(&smem_limit).ok()) return false;
  bool mimo_tc = true;
  if (!mimo_tensor_core_gate(&mimo_tc).ok()) return false;
  ForwardArgs f;
  f.in = a.in;
  bool tc = false;
  return pick_backward_rows(a, d, make_params(f, d), smem_limit, mimo_tc, &tc) > 0 && tc;
}

// MAMBA3_CUDA_SAVE_TILES: unset, empty or 1: a training forward on the tensor-core path saves
// the tile records, chunk-start states and decays for the backward (saved_numel > 0); 0: it
// saves nothing and the backward recomputes them. Anything else is an error naming it.
inline Status save_tiles_gate(bool* on) { return default_on_gate("MAMBA3_CUDA_SAVE_TILES", on); }

// The saved-activation layout of these inputs (bytes 0: nothing is saved): the backward must
// take the tensor-core chunk kernels (64-row chunks) and `forward_tc` says the forward does.
inline Status saved_layout_for(const Inputs& in, const Dims& d, bool forward_tc,
                               SavedLayout* out) {
  *out = SavedLayout{};
  bool on = true;
  M3_RETURN_IF_ERROR(save_tiles_gate(&on));
  if (!on || !forward_tc || d.S * d.H == 0 || !check_backward_supported(d).ok()) return Status::Ok();
  BackwardArgs b;
  b.in = in;
  bool mimo_tc = true;
  M3_RETURN_IF_ERROR(mimo_tensor_core_gate(&mimo_tc));
  int smem_limit = 0;
  M3_RETURN_IF_ERROR(max_dynamic_smem(&smem_limit));
  ForwardArgs f;
  f.in = in;
  bool tc = false;
  const int rows = pick_backward_rows(b, d, make_params(f, d), smem_limit, mimo_tc, &tc);
  if (!tc || rows != kRecordRows) return Status::Ok();
  return gated_saved_layout(in, d, out);
}

// The whole backward on `a.stream`; arguments validated, tensors on the device.
inline Status backward_chunked(const BackwardArgs& a, const Dims& d) {
  M3_RETURN_IF_ERROR(check_backward_supported(d));
  bool mimo_tc = true;
  M3_RETURN_IF_ERROR(mimo_tensor_core_gate(&mimo_tc));
  if (d.S * d.H == 0) return Status::Ok();
  int smem_limit = 0;
  M3_RETURN_IF_ERROR(max_dynamic_smem(&smem_limit));
  BwdParams bp = make_bwd_params(a, d);
  bool tc = false;
  const int rows = pick_backward_rows(a, d, bp.p, smem_limit, mimo_tc, &tc);
  if (!tc) M3_RETURN_IF_ERROR(psiv_cache_refused("backward", "the fp32 SIMT kernels"));
  bool psiv = false;
  M3_RETURN_IF_ERROR(psiv_cache_on(a.in, &psiv));
  if (rows == 0)
    return Status::NotSupported("cuda lane backward: N = " + std::to_string(d.N) + ", P = " +
                                std::to_string(d.P) + " does not fit the device's shared memory");
  bp.rows = rows, bp.C = rows / static_cast<int>(d.R);
  // The forward's saved buffer (its size already checked against saved_numel of these inputs by
  // the API, so tc and rows == 64 hold; checked again here against this call's choice); its
  // header is compared on the device by bwd_plan_kernel.
  const bool from_saved = a.saved.defined() && a.saved.ndim == 1 && a.saved.shape[0] > 0;
  SavedLayout sl{};
  if (from_saved) {
    M3_RETURN_IF_ERROR(gated_saved_layout(a.in, d, &sl));
    if (!tc || sl.bytes != a.saved.shape[0] * 4 || rows != kRecordRows)
      return Status::InvalidArgument(
          "saved: not a saved buffer of the tensor-core path for these inputs (its size must be "
          "saved_numel of them, with the same MAMBA3_CUDA_SAVE_TILES / MAMBA3_CUDA_BWD_MIMO_TC / "
          "MAMBA3_PSIV_CACHE / MAMBA3_CUDA_SAVE_Y)");
    if (reinterpret_cast<uintptr_t>(a.saved.data) % 16 != 0)
      return Status::InvalidArgument("saved: data must be 16-byte aligned");
    bp.saved_hdr = static_cast<const int32_t*>(a.saved.data);
    for (int i = 0; i < kSavedHeaderInts; ++i) bp.want_hdr[i] = sl.header[i];
  }
  const int N = static_cast<int>(d.N), P = static_cast<int>(d.P), R = static_cast<int>(d.R);
  const int H = static_cast<int>(d.H), NA = static_cast<int>(d.NA), S = static_cast<int>(d.S);
  BwdSmem l3{}, l5{}, l7{};  // the SIMT kernels' layouts at `rows` (unused with tc)
  if (!tc) pick_rows(d, smem_limit, &l3, &l5, &l7);
  // token_grads keeps its two (C, NA) tiles at row pitch NA + 1.
  const BwdSmem l9 = bwd_smem_layout(N, P, R, NA + 1, rows, kPartTH | kPartDTH);
  const int64_t C = bp.C, L = d.L;
  const int64_t ncu = d.varlen ? (L + C - 1) / C + S : S * ((L + C - 1) / C);
  const int64_t cells = ncu * H, PN = static_cast<int64_t>(P) * N;
  const bool has_init = a.in.initial.all();
  const bool shared_qk = d.heads_per_group() > 1;
  const TcSmem lt = tc_layout(kTcGrad, N, P, R, NA, rows, bp.g_psi.defined());
  TcSmem lo = tc_layout(kTcOut, N, P, R, NA, rows);
  const TcSmem ls = tc_layout(kTcState, N, P, R, NA, rows);

  const cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  WorkspaceBuffer buf(stream);
  Workspace& ws = bp.ws;
  buf.reserve(&ws.chunk_off, S + 1);
  if (!from_saved) {
    buf.reserve(&ws.theta, cells * NA);
    buf.reserve(&ws.decay, cells);
    buf.reserve(&ws.s_prev, cells * PN);
  }
  buf.reserve(&ws.ds_end, cells * PN);
  buf.reserve(&ws.dy, bp.L_tot * H * R * P);
  if (shared_qk && a.grads.q.defined()) buf.reserve(&ws.dq, bp.L_tot * H * R * N);
  if (shared_qk && a.grads.k.defined()) buf.reserve(&ws.dk, bp.L_tot * H * R * N);
  buf.reserve(&ws.tok, 2 * H * bp.L_tot);
  buf.reserve(&ws.dth, bp.L_tot * H * NA);
  buf.reserve(&ws.dthc, cells * NA);
  buf.reserve(&ws.bnd, cells * NA);
  buf.reserve(&ws.par, cells * bp.pf.count);
  if (has_init) {
    buf.reserve(&ws.ds0, S * H * PN);
    buf.reserve(&ws.initp, S * H * (R * P + 1));
  }
  if (tc && !from_saved) {  // the chunk loader's output, once per chunk (bwd_tc.cuh, tc_chunk_tiles)
    bp.tr = tile_record(N, P, rows, bp.C, NA, psiv);
    buf.reserve(&ws.tiles, cells * bp.tr.bytes);
  }
  M3_RETURN_IF_ERROR(buf.allocate());
  if (from_saved) {
    if (sl.cells != cells)
      return Status::Internal("saved: layout of " + std::to_string(sl.cells) + " cells, the backward has " +
                              std::to_string(cells));
    SavedPtrs sp;
    M3_RETURN_IF_ERROR(saved_ptrs(a.saved.data, sl, &sp));
    ws.decay = sp.decay, ws.s_prev = sp.s_prev, ws.tiles = sp.tiles, bp.tr = sp.tr;
    ws.y = saved_y(sp);
    if (ws.y) lo = tc_layout(kTcOutY, N, P, R, NA, rows);  // chunk_out reads y
  }

  const unsigned grid_ch = static_cast<unsigned>(ncu), seq_heads = static_cast<unsigned>(S * H);
  // The state scans take 4 consecutive elements per thread where they share a row (N % 4 == 0).
  const bool scan4 = N % 4 == 0;
  const int64_t scan_threads = scan4 ? PN / 4 : PN;
  const unsigned pn_blocks = static_cast<unsigned>((scan_threads + kThreads - 1) / kThreads);
  const size_t par_bytes = sizeof(float) * (3 * R * P + P);
  const size_t init_bytes = sizeof(float) * (4 * R * P + 2 * P);
  const size_t angle_bytes = sizeof(float) * (bp.C * NA + kMaxRows);
  GradTcKernel grad_tc = tc ? grad_tc_kernel(N, P, R) : nullptr;
  OutTcKernel out_tc = tc ? out_tc_kernel(P, R, ws.y != nullptr) : nullptr;
  if (tc) {
    M3_RETURN_IF_ERROR(
        allow_smem_max_carveout(bwd_chunk_state_tc_kernel, static_cast<size_t>(ls.bytes)));
    M3_RETURN_IF_ERROR(
        allow_smem_max_carveout(out_tc, static_cast<size_t>(lo.bytes)));
    M3_RETURN_IF_ERROR(allow_smem_max_carveout(grad_tc, static_cast<size_t>(lt.bytes)));
  } else {
    M3_RETURN_IF_ERROR(allow_smem(bwd_chunk_state_kernel, smem_bytes(l3)));
    M3_RETURN_IF_ERROR(allow_smem(bwd_chunk_out_kernel, smem_bytes(l5)));
    M3_RETURN_IF_ERROR(allow_smem(bwd_chunk_grad_kernel, smem_bytes(l7)));
  }
  M3_RETURN_IF_ERROR(allow_smem(bwd_token_grads_kernel, smem_bytes(l9)));

  M3B_LAUNCH(bwd_plan_kernel, (1), (32), 0, stream, bp);
  M3B_CHECK_LAUNCH("bwd_plan_kernel");
  if (ncu > 0 && !from_saved) {  // the loader pass and the state scan (saved: done by the forward)
    if (NA > 0) {
      M3B_LAUNCH(bwd_angle_sum_kernel, (grid_ch, H), (kThreads), angle_bytes, stream, bp);
      M3B_CHECK_LAUNCH("bwd_angle_sum_kernel");
      M3B_LAUNCH(bwd_angle_scan_kernel, (seq_heads), (64), 0, stream, bp);
      M3B_CHECK_LAUNCH("bwd_angle_scan_kernel");
    }
    if (tc) {
      M3B_LAUNCH(bwd_chunk_state_tc_kernel, (grid_ch, H), (kThreads),
                 static_cast<size_t>(ls.bytes), stream, bp, ls);
      M3B_CHECK_LAUNCH("bwd_chunk_state_tc_kernel");
    } else {
      M3B_LAUNCH(bwd_chunk_state_kernel, (grid_ch, H), (kThreads), smem_bytes(l3), stream, bp, l3);
      M3B_CHECK_LAUNCH("bwd_chunk_state_kernel");
    }
    if (scan4)
      M3B_LAUNCH(bwd_state_scan_kernel<4>, (seq_heads, pn_blocks), (kThreads), par_bytes, stream,
                 bp);
    else
      M3B_LAUNCH(bwd_state_scan_kernel<1>, (seq_heads, pn_blocks), (kThreads), par_bytes, stream,
                 bp);
    M3B_CHECK_LAUNCH("bwd_state_scan_kernel");
  }
  if (ncu > 0) {
    if (tc) {
      M3B_LAUNCH(out_tc, (grid_ch, H), (kThreads), static_cast<size_t>(lo.bytes), stream, bp, lo);
      M3B_CHECK_LAUNCH("bwd_chunk_out_tc_kernel");
    } else {
      M3B_LAUNCH(bwd_chunk_out_kernel, (grid_ch, H), (kThreads), smem_bytes(l5), stream, bp, l5);
      M3B_CHECK_LAUNCH("bwd_chunk_out_kernel");
    }
  }
  if (scan4)
    M3B_LAUNCH(bwd_dstate_scan_kernel<4>, (seq_heads, pn_blocks), (kThreads), 0, stream, bp);
  else
    M3B_LAUNCH(bwd_dstate_scan_kernel<1>, (seq_heads, pn_blocks), (kThreads), 0, stream, bp);
  M3B_CHECK_LAUNCH("bwd_dstate_scan_kernel");
  if (ncu > 0) {
    if (tc) {
      M3B_LAUNCH(grad_tc, (grid_ch, H), (kThreads), static_cast<size_t>(lt.bytes), stream, bp, lt);
      M3B_CHECK_LAUNCH("bwd_chunk_grad_tc_kernel");
    } else {
      M3B_LAUNCH(bwd_chunk_grad_kernel, (grid_ch, H), (kThreads), smem_bytes(l7), stream, bp, l7);
      M3B_CHECK_LAUNCH("bwd_chunk_grad_kernel");
    }
  }
  if (NA > 0) {
    if (ncu > 0) {
      M3B_LAUNCH(bwd_angle_boundary_kernel, (grid_ch, H), (kThreads), sizeof(float) * kThreads,
                 stream, bp);
      M3B_CHECK_LAUNCH("bwd_angle_boundary_kernel");
    }
    M3B_LAUNCH(bwd_dtheta_scan_kernel, (seq_heads), (64), 0, stream, bp);
    M3B_CHECK_LAUNCH("bwd_dtheta_scan_kernel");
  }
  if (has_init) {
    M3B_LAUNCH(bwd_init_grads_kernel, (seq_heads), (kThreads), init_bytes, stream, bp);
    M3B_CHECK_LAUNCH("bwd_init_grads_kernel");
  }
  if (ncu > 0) {
    M3B_LAUNCH(bwd_token_grads_kernel, (grid_ch, H), (kThreads), smem_bytes(l9), stream, bp, l9);
    M3B_CHECK_LAUNCH("bwd_token_grads_kernel");
  }
  const int64_t qk_elems = bp.L_tot * d.G * R * N;
  const unsigned qk_blocks =
      static_cast<unsigned>(std::min<int64_t>((qk_elems + kThreads - 1) / kThreads, 65536));
  if (qk_elems > 0) {
    if (ws.dq) {
      M3B_LAUNCH(bwd_reduce_qk_kernel, (qk_blocks), (kThreads), 0, stream, bp, ws.dq, bp.g_q);
      M3B_CHECK_LAUNCH("bwd_reduce_qk_kernel");
    }
    if (ws.dk) {
      M3B_LAUNCH(bwd_reduce_qk_kernel, (qk_blocks), (kThreads), 0, stream, bp, ws.dk, bp.g_k);
      M3B_CHECK_LAUNCH("bwd_reduce_qk_kernel");
    }
  }
  M3B_LAUNCH(bwd_reduce_par_kernel,
             (static_cast<unsigned>(H), static_cast<unsigned>((bp.pf.count + kThreads - 1) / kThreads)),
             (kThreads), 0, stream, bp);
  M3B_CHECK_LAUNCH("bwd_reduce_par_kernel");
  return Status::Ok();
}

}  // namespace mamba3::cuda::bwd
