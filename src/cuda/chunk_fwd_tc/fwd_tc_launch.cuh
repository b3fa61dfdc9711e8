// Host side of the tensor-core forward (fwd_tc_kernel.cuh): when it serves the inputs, the
// sequence split, its workspace and the launch sequence, with or without the saved buffer.
// Compiled by nvcc in dispatch.cu, and as plain C++ by the CPU emulation test (MAMBA3_CUDA_EMU,
// tests/emu/test_fwd_emu.cpp), which runs the same kernels with one host thread per CUDA thread.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/return_if_error.h"
#include "core/validate.h"
#include "cuda/chunk_fwd_tc/fwd_tc_kernel.cuh"
#include "cuda/common/launch.cuh"
#include "cuda/common/tile_record.cuh"
#include "cuda/common/tma_map.h"

#ifndef MAMBA3_CUDA_EMU
#include "cuda/common/check.cuh"
#include "cuda/common/workspace.h"
#endif

namespace mamba3::cuda::fwd_tc {

#ifdef MAMBA3_CUDA_EMU
#define M3F_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), ::m3emu::launch(kernel, dim3(grid), dim3(block), smem, __VA_ARGS__))
#define M3F_CHECK_LAUNCH(name) (void)0
#else
#define M3F_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define M3F_CHECK_LAUNCH(name) MAMBA3_CHECK_LAUNCH(name)
#endif

// MAMBA3_CUDA_SEG_LEN: tokens per segment of the sequence split (a positive multiple of 64), to
// test or tune it; unset: chosen from the grid size. Anything else is an error, not "unset".
inline Status segment_override(int64_t* seg_len) {
  *seg_len = 0;
  const char* env = std::getenv("MAMBA3_CUDA_SEG_LEN");
  if (env == nullptr || *env == '\0') return Status::Ok();
  char* endp = nullptr;
  const long long v = std::strtoll(env, &endp, 10);
  if (*endp != '\0' || v <= 0 || v % 64 != 0)
    return Status::InvalidArgument(std::string("MAMBA3_CUDA_SEG_LEN: expected a positive multiple "
                                               "of 64 tokens, got '") + env + "'");
  *seg_len = v;
  return Status::Ok();
}

// The tensor-core forward serves bf16 q, k, v with 16-byte aligned contiguous rows
// (CoreParams::tc_vec) at N, P in {64, 128}, R dividing the 64-row chunk, NA <= 64.
inline bool forward_uses_tensor_cores(const Inputs& in, const Dims& d, const CoreParams& p) {
  return in.q.dtype == DType::kBF16 && in.k.dtype == DType::kBF16 && in.v.dtype == DType::kBF16 &&
         p.tc_vec && (d.N == 64 || d.N == 128) && (d.P == 64 || d.P == 128) &&
         kTcRows % d.R == 0 && d.NA <= 64;
}

// Training: ForwardArgs::saved (its size already checked against saved_numel by the API, so
// the layout applies) gets the tile records, chunk-start states, decays and y; `*sv` stays empty
// (null base) without a saved buffer.
inline Status forward_saved_ptrs(const ForwardArgs& a, const Dims& d, SavedPtrs* sv) {
  *sv = SavedPtrs{};
  if (!(a.saved.defined() && a.saved.ndim == 1 && a.saved.shape[0] > 0)) return Status::Ok();
  SavedLayout l;
  M3_RETURN_IF_ERROR(gated_saved_layout(a.in, d, &l));
  if (l.bytes != a.saved.shape[0] * 4)
    return Status::InvalidArgument("saved: expected " + std::to_string(l.bytes / 4) +
                                   " float32 elements for these inputs, got " +
                                   std::to_string(a.saved.shape[0]));
  if (reinterpret_cast<uintptr_t>(a.saved.data) % 16 != 0)
    return Status::InvalidArgument("saved: data must be 16-byte aligned");
  return saved_ptrs(a.saved.data, l, sv);
}

// MAMBA3_CUDA_SEG_SUB: how many of the state pass's segments make one of the output pass's (a
// positive integer up to kMaxSub; with MAMBA3_CUDA_SEG_LEN it must divide it into multiples of
// 64 tokens); unset: chosen from the grid size.
inline constexpr int kMaxSub = 1024;
inline Status segment_sub_override(int64_t* sub) {
  int v = 0;
  M3_RETURN_IF_ERROR(env_positive("MAMBA3_CUDA_SEG_SUB", &v));
  if (v > kMaxSub)
    return Status::InvalidArgument("MAMBA3_CUDA_SEG_SUB: at most " + std::to_string(kMaxSub) +
                                   ", got " + std::to_string(v));
  *sub = v;
  return Status::Ok();
}

// The sequence split of a call (DESIGN §2.5): MAMBA3_CUDA_SEG_LEN, else segments only when
// (sequences x heads) CTAs would leave SMs idle. nseg == 1: no split. The state pass then cuts
// each segment into `sub` (MAMBA3_CUDA_SEG_SUB, else as many as fill one wave with the
// segments before the last one, none shorter than kMinSubLen tokens).
inline constexpr int64_t kMinSubLen = 512;
inline Status choose_segments(const Dims& d, int64_t max_len, SegParams* sp) {
  *sp = SegParams{};
  const int64_t heads = d.S * d.H;
  int64_t seg_len = 0, sub = 0;
  M3_RETURN_IF_ERROR(segment_override(&seg_len));
  M3_RETURN_IF_ERROR(segment_sub_override(&sub));
  const bool forced = seg_len > 0;
  if (forced && sub > 0 && seg_len % (64 * sub) != 0)
    return Status::InvalidArgument("MAMBA3_CUDA_SEG_SUB=" + std::to_string(sub) +
                                   " does not cut MAMBA3_CUDA_SEG_LEN=" + std::to_string(seg_len) +
                                   " into multiples of 64 tokens");
  if (seg_len == 0) {
    // Two CTAs per SM: split only when fewer (sequence, head) pairs than CTA slots, into as
    // many segments as fill one wave, none shorter than 1024 tokens.
    const int64_t slots = 2LL * sm_count();
    const int64_t want = heads < slots ? slots / heads : 1;
    if (want > 1) {
      seg_len = (max_len + want - 1) / want;
      seg_len = std::max<int64_t>(1024, (seg_len + 63) / 64 * 64);
    }
  }
  if (seg_len > 0 && max_len > seg_len) {
    int64_t nseg = (max_len + seg_len - 1) / seg_len;
    const bool auto_sub = sub == 0;
    if (auto_sub) {
      // The state pass runs heads x (nseg - 1) segments at sub = 1; cut finer while that stays
      // within one wave of two CTAs per SM.
      sub = std::max<int64_t>(1, 2LL * sm_count() / (heads * (nseg - 1)));
      sub = std::min<int64_t>(sub, std::max<int64_t>(1, seg_len / kMinSubLen));
    }
    if (!forced)  // the segment grows to a multiple of 64 x sub tokens (nseg stays or shrinks)
      seg_len = (seg_len + 64 * sub - 1) / (64 * sub) * (64 * sub);
    else if (auto_sub)
      while (seg_len % (64 * sub) != 0) --sub;
    nseg = (max_len + seg_len - 1) / seg_len;
    if (nseg > 1) {
      sp->nseg = static_cast<int>(nseg);
      sp->seg_len = static_cast<int>(seg_len);
      sp->sub = static_cast<int>(sub);
    }
  }
  return Status::Ok();
}

// The copy engine's maps of the kernel's tiles (FwdMaps): q and k, v, z (z_vec) and the fp32
// angle rows (ang_vec4, NA > 0); v, z and angles (B, L, H, X) as rows of X elements per (batch,
// head) with boxes of one chunk's C tokens. The conditions of those flags (and of the
// tensor-core path for q, k and v) make the views legal; a refusal here is an internal error.
inline Status forward_maps(const CoreParams& p, const Dims& d, FwdMaps* mp) {
  *mp = FwdMaps{};
  const int C = kTcRows / static_cast<int>(d.R);
  auto encode = [](const RowTileView& rv, const void* base, const char* what, TmaMap* map) {
    if (!rv.error.empty())
      return Status::Internal(std::string("tensor-core forward: ") + what + ": " + rv.error);
    return make_tma_map(rv.view, base, what, map);
  };
  auto rows = [&](const DTensor& T, int64_t cols, int box_cols, int elem_bytes, const char* what,
                  TmaMap* map) -> Status {
    RowTensor t;
    t.batch = d.B, t.tokens = d.L, t.ranks = 1, t.heads = d.H, t.cols = cols;
    t.s_batch = T.stride[0], t.s_token = T.stride[1], t.s_head = T.stride[2], t.s_col = T.stride[3];
    t.elem_bytes = elem_bytes;
    return encode(row_tile_view(t, reinterpret_cast<uintptr_t>(T.data), C, box_cols, 0), T.data,
                  what, map);
  };
  // q and k: (B, L, R, G, N), or (B, L, G, N) shared by the R ranks (rank stride 0), boxes of
  // all R ranks of C tokens with N + 8 columns (the padded pitch of the kernel's tiles; the 8
  // past N arrive as zeros).
  auto qk = [&](const DTensor& T, const char* what, TmaMap* map) -> Status {
    const bool rank_dim = T.ndim == 5;
    RowTensor t;
    t.batch = d.B, t.tokens = d.L, t.ranks = d.R, t.heads = d.G, t.cols = d.N;
    t.s_batch = T.stride[0], t.s_token = T.stride[1], t.s_rank = rank_dim ? T.stride[2] : 0;
    t.s_head = T.stride[rank_dim ? 3 : 2], t.s_col = T.stride[rank_dim ? 4 : 3];
    t.elem_bytes = 2;
    return encode(
        rank_tile_view(t, reinterpret_cast<uintptr_t>(T.data), static_cast<int>(d.N) + 8, C),
        T.data, what, map);
  };
  M3_RETURN_IF_ERROR(qk(p.q, "q", &mp->q));
  M3_RETURN_IF_ERROR(qk(p.k, "k", &mp->k));
  const int P = static_cast<int>(d.P), NA = static_cast<int>(d.NA);
  M3_RETURN_IF_ERROR(rows(p.v, P, P, 2, "v", &mp->v));
  if (p.z_vec) M3_RETURN_IF_ERROR(rows(p.z, P, P, 2, "z", &mp->z));
  // The angle rows land with the padded pitch tc_ang_pitch(NA): the box's last 4 columns lie
  // past the tensor's NA and arrive as zeros.
  if (p.ang_vec4 && NA > 0)
    M3_RETURN_IF_ERROR(rows(p.angles, NA, tc_ang_pitch(NA), 4, "angles", &mp->ang));
  return Status::Ok();
}

// Tensor-core forward for bf16 q, k, v with aligned rows at the compiled (N, P); `max_len` is
// the longest sequence (packed sequences: checked on the host by the caller).
template <int N, int P>
Status launch_forward_tc(const CoreParams& p, const Dims& d, int64_t max_len, const SavedPtrs& sv,
                         cudaStream_t stream) {
  const TcLay lay = tc_layout<N, P>(p.R, p.NA);
  const size_t bytes = static_cast<size_t>(lay.bytes);
  const int64_t heads = d.S * d.H;
  SegParams sp;
  M3_RETURN_IF_ERROR(choose_segments(d, max_len, &sp));
  FwdMaps mp;
  M3_RETURN_IF_ERROR(forward_maps(p, d, &mp));
  const unsigned grid = static_cast<unsigned>(heads * sp.nseg);
  // The output pass: with a saved buffer (training) the instance that also writes the records,
  // and y where the buffer has it (its own instance: one instance with a runtime branch around
  // the y stores was 8 % slower at `train` with y off than before y existed; H200, 2026-12-01).
  auto launch_output = [&](auto kernel, const char* what) -> Status {
    M3_RETURN_IF_ERROR(allow_smem_max_carveout(kernel, bytes));
    M3F_LAUNCH(kernel, grid, kTcThreads, bytes, stream, p, sp, sv, mp);
    M3F_CHECK_LAUNCH(what);
    return Status::Ok();
  };
  auto output_pass = [&]() -> Status {
    if (saved_y(sv) != nullptr)
      return launch_output(fwd_tc_kernel<N, P, false, true, true>,
                           "fwd_tc_kernel (saving, with y)");
    if (sv.base) return launch_output(fwd_tc_kernel<N, P, false, true>, "fwd_tc_kernel (saving)");
    return launch_output(fwd_tc_kernel<N, P, false>, "fwd_tc_kernel");
  };
  if (sp.nseg == 1) return output_pass();
  // Workspace for the split: stream-ordered (the lane's pool, cuda/common/workspace.h), so the
  // call stays asynchronous and capturable.
  // Pass 1's arrays hold nseg * sub slots per sequence and head (pass 2 reads the start of its
  // segment j at j * sub).
  const int64_t slots = heads * sp.nseg * sp.sub, pn = static_cast<int64_t>(d.P) * d.N;
  const size_t ws_bytes = sizeof(float) * (2 * slots * pn + slots) +
                          sizeof(double) * 2 * slots * std::max<int64_t>(d.NA, 1);
  void* ws = nullptr;
#ifdef MAMBA3_CUDA_EMU
  ws = std::malloc(ws_bytes);
  std::memset(ws, 0xff, ws_bytes);  // NaN everywhere: an unwritten read shows up
#else
  MAMBA3_CHECK_CUDA(workspace_alloc(&ws, ws_bytes, stream));
#endif
  double* th = static_cast<double*>(ws);
  sp.end_theta = th;
  sp.start_theta = th + slots * std::max<int64_t>(d.NA, 1);
  float* f = reinterpret_cast<float*>(sp.start_theta + slots * std::max<int64_t>(d.NA, 1));
  sp.end_state = f;
  sp.start_state = f + slots * pn;
  sp.end_decay = f + 2 * slots * pn;
  // Pass 1's split: each of pass 2's segments cut into sp.sub.
  SegParams s1 = sp;
  s1.nseg = sp.nseg * sp.sub;
  s1.seg_len = sp.seg_len / sp.sub;
  Status st = [&]() -> Status {
    auto states = fwd_tc_kernel<N, P, true>;
    M3_RETURN_IF_ERROR(allow_smem_max_carveout(states, bytes));  // two CTAs per SM, as pass 2
    M3F_LAUNCH(states, static_cast<unsigned>(slots), kTcThreads, bytes, stream, p, s1, SavedPtrs{},
               mp);
    M3F_CHECK_LAUNCH("fwd_tc_kernel (segment states)");
    auto combine = fwd_tc_combine<N, P>;
    M3F_LAUNCH(combine, static_cast<unsigned>(heads), 256, 0, stream, p, s1);
    M3F_CHECK_LAUNCH("fwd_tc_combine");
    return output_pass();
  }();
#ifdef MAMBA3_CUDA_EMU
  std::free(ws);
  return st;
#else
  const cudaError_t fe = cudaFreeAsync(ws, stream);
  if (!st.ok()) return st;
  if (fe != cudaSuccess)
    return Status::Internal(std::string("CUDA error in cudaFreeAsync: ") + cudaGetErrorString(fe));
  return Status::Ok();
#endif
}

// The instance for the call's (N, P); forward_uses_tensor_cores holds.
inline Status launch_forward_tc(const CoreParams& p, const Dims& d, int64_t max_len,
                                const SavedPtrs& sv, cudaStream_t stream) {
  if (d.N == 64 && d.P == 64) return launch_forward_tc<64, 64>(p, d, max_len, sv, stream);
  if (d.N == 64 && d.P == 128) return launch_forward_tc<64, 128>(p, d, max_len, sv, stream);
  if (d.N == 128 && d.P == 64) return launch_forward_tc<128, 64>(p, d, max_len, sv, stream);
  return launch_forward_tc<128, 128>(p, d, max_len, sv, stream);
}

}  // namespace mamba3::cuda::fwd_tc
