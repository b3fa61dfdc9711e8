// What the tensor-core chunk loader produces for one (chunk, head), in the layout both the
// forward (when it saves activations for the backward) and the backward (chunk_state_tc, or the
// forward's saved buffer) store it: the tile record. And the cuda lane's ForwardArgs::saved,
// which holds one record, the chunk-start state and the decay of every (chunk, head).
#pragma once

#include <cstdint>
#include <string>

#include "core/return_if_error.h"
#include "core/validate.h"
#include "cuda/common/launch.cuh"

namespace mamba3::cuda {

// The loader's per-token scalar arrays, kMaxRows (64) floats each, in this order in a record
// (the backward's ScalarArray continues the numbering with its own arrays).
enum LoaderScalar : int {
  kCs = 0,  // inclusive cumulative sum of adt inside the chunk (per token)
  kE,       // exp(cs)
  kW,       // w = gamma + sgamma (per token)
  kFw,      // exp(cs_last - cs) * w
  kGam,     // gamma = lambda * dt
  kLam,     // lambda = sigmoid(trap)
  kDt,      // dt
  kLoaderScalars,
};
inline constexpr int kRecordRows = 64;  // rows of a tensor-core chunk (kTcRows, kMaxRows)

// One chunk's record, byte offsets (16-byte aligned): the rotated biased q and k rows and, with
// the PsiV cache (MAMBA3_PSIV_CACHE=1), the v * psi rows as the tensor-core loader rounds them
// (bf16, rows x N | P, dense; rows past the chunk zero), the wrapped angles (C x NA fp32) and the
// scalar arrays (kLoaderScalars x 64 fp32). Without the cache v = -1: the readers build v * psi
// again from the raw v and psi (tc_fetch_v_rows, tc_scale_v_rows: the same bits). 42 KB at
// N = 128, P = 64, R = 1, NA = 32, 64-row chunks (50 KB with the cache).
struct TileRecord {
  int q, k, v, th, sc, bytes;
};
__host__ __device__ inline TileRecord tile_record(int N, int P, int rows, int C, int NA,
                                                  bool psiv) {
  auto up16 = [](int x) { return (x + 15) & ~15; };
  TileRecord r;
  r.q = 0;
  r.k = r.q + rows * N * 2;
  r.v = psiv ? r.k + rows * N * 2 : -1;
  r.th = r.k + rows * N * 2 + (psiv ? rows * P * 2 : 0);
  r.sc = r.th + up16(C * NA * 4);
  r.bytes = r.sc + kLoaderScalars * kRecordRows * 4;
  return r;
}

// ForwardArgs::saved of the cuda lane (tensor-core path): a header of kSavedHeaderInts int32,
// then per (chunk, head) cell, cell = chunk id * H + head (chunk ids flat over the sequences, as
// the backward numbers them): the decay exp(cs_last) (fp32), the state at the chunk's start
// (P x N fp32, the initial state for a sequence's first chunk), the tile record and, unless
// MAMBA3_CUDA_SAVE_Y=0, the chunk's y before the output stage (kRecordRows x P fp32, row t R + r
// for token t and rank r; rows past the chunk not written), which spares the backward's
// chunk_out the products that recompute it. Offsets in bytes, each region 256-byte aligned.
inline constexpr int kSavedHeaderInts = 16;
inline constexpr int32_t kSavedMagicCuda = 0x4d334355;  // "M3CU"
inline constexpr int32_t kSavedVersionCuda = 3;  // 2: PsiV flag (header[11] bit 3); 3: y (bit 4)

inline constexpr int32_t kSavedFlagY = 16;  // header[11]: the buffer carries y

struct SavedLayout {
  int64_t cells = 0;   // ncu * H
  int64_t decay = 0, s_prev = 0, tiles = 0, y = 0, bytes = 0;  // y 0: not saved
  TileRecord tr{};
  int32_t header[kSavedHeaderInts] = {};
};

// The layout for validated dimensions; ncu is the backward's bound on the chunk count (packed
// sequences: ceil(L / C) + S, else S * ceil(L / C)). psiv: the records carry v psi (the PsiV
// cache); y: the buffer carries y (save_y_gate). Whether the inputs get a saved buffer at all is
// the lane's call (saved_layout_for in chunk_bwd/bwd_launch.cuh).
__host__ inline SavedLayout saved_layout(const Inputs& in, const Dims& d, bool psiv, bool y) {
  SavedLayout s;
  const int64_t C = kRecordRows / d.R;
  const int64_t ncu = d.varlen ? (d.L + C - 1) / C + d.S : d.S * ((d.L + C - 1) / C);
  s.cells = ncu * d.H;
  s.tr = tile_record(static_cast<int>(d.N), static_cast<int>(d.P), kRecordRows,
                     static_cast<int>(C), static_cast<int>(d.NA), psiv);
  auto up256 = [](int64_t x) { return (x + 255) / 256 * 256; };
  int64_t o = 256;  // the header
  s.decay = o, o += up256(s.cells * 4);
  s.s_prev = o, o += up256(s.cells * d.P * d.N * 4);
  s.tiles = o, o += up256(s.cells * s.tr.bytes);
  if (y) s.y = o, o += up256(s.cells * kRecordRows * d.P * 4);
  s.bytes = o;
  const bool interleaved = in.rope_pairing == RopePairing::kInterleaved;
  const int32_t h[kSavedHeaderInts] = {kSavedMagicCuda,
                                       kSavedVersionCuda,
                                       static_cast<int32_t>(d.B),
                                       static_cast<int32_t>(d.L),
                                       static_cast<int32_t>(d.H),
                                       static_cast<int32_t>(d.G),
                                       static_cast<int32_t>(d.N),
                                       static_cast<int32_t>(d.P),
                                       static_cast<int32_t>(d.R),
                                       static_cast<int32_t>(d.NA),
                                       static_cast<int32_t>(d.S),
                                       (d.varlen ? 1 : 0) | (interleaved ? 2 : 0) |
                                           (d.per_rank_out ? 4 : 0) | (psiv ? 8 : 0) |
                                           (y ? kSavedFlagY : 0),
                                       static_cast<int32_t>(C),
                                       static_cast<int32_t>(s.cells & 0x7fffffff),
                                       static_cast<int32_t>(s.cells >> 31),
                                       static_cast<int32_t>(s.tr.bytes)};
  for (int i = 0; i < kSavedHeaderInts; ++i) s.header[i] = h[i];
  return s;
}

// Whether this call's tile records carry v psi (the PsiV cache, DESIGN.md §3): MAMBA3_PSIV_CACHE
// 1 / 0, and where unset, on where psi (mimo_v) is given. Measured (H200, 2026-11-30, same run,
// training forward + backward): with psi (`megacpp`, R = 4) the cache is 3.2 % faster, at `train`
// with R = 4 1.1 %; without psi v psi is v itself, and copying it into the records made SISO
// `train` 0.8 % slower (NOTES.md, "PsiV cache").
__host__ inline Status psiv_cache_on(const Inputs& in, bool* on) {
  GateValue v = GateValue::kUnset;
  M3_RETURN_IF_ERROR(psiv_cache_gate(&v));
  *on = v == GateValue::kOn || (v == GateValue::kUnset && in.mimo_v.defined());
  return Status::Ok();
}

// MAMBA3_CUDA_SAVE_Y: unset, empty or 1: the saved buffer carries y (the default: H200,
// 2026-12-01, same run, training forward + backward 4.0 % faster at `train`, 3.1 % at `megacpp`,
// for R P 4 more bytes per token and head); 0: it does not, and the backward's chunk_out
// recomputes y from the record and the start state. Anything else is an error naming it.
__host__ inline Status save_y_gate(bool* on) { return default_on_gate("MAMBA3_CUDA_SAVE_Y", on); }

// The saved buffer's layout under this call's gates (MAMBA3_PSIV_CACHE, MAMBA3_CUDA_SAVE_Y): the
// one place where the forward (forward_saved_ptrs), the size query (saved_layout_for) and the
// backward read them, so that the three agree.
__host__ inline Status gated_saved_layout(const Inputs& in, const Dims& d, SavedLayout* out) {
  bool psiv = false, y = true;
  M3_RETURN_IF_ERROR(psiv_cache_on(in, &psiv));
  M3_RETURN_IF_ERROR(save_y_gate(&y));
  *out = saved_layout(in, d, psiv, y);
  return Status::Ok();
}

// An explicit MAMBA3_PSIV_CACHE=1 on a cuda path without the cache (the SIMT kernels): the
// error naming the gate; Ok otherwise. `what`: "forward" or "backward".
__host__ inline Status psiv_cache_refused(const char* what, const char* path) {
  GateValue v = GateValue::kUnset;
  M3_RETURN_IF_ERROR(psiv_cache_gate(&v));
  if (v != GateValue::kOn) return Status::Ok();
  return Status::NotSupported(std::string(kPsivGate) +
                              "=1: the PsiV cache is implemented on the cuda lane's tensor-core "
                              "path only (bf16 q, k, v with 16-byte aligned contiguous rows at N, "
                              "P in {64, 128}); this " + what + " takes " + path +
                              "; unset the gate to run it");
}

// Device pointers of a saved buffer (null base: nothing saved).
struct SavedPtrs {
  unsigned char* base = nullptr;
  float* decay = nullptr;
  float* s_prev = nullptr;
  unsigned char* tiles = nullptr;
  TileRecord tr{};
  int32_t header[kSavedHeaderInts] = {};
};

// The y region of a saved buffer (saved_layout: right after the records; (cells, kRecordRows, P)
// fp32), or null where the header says the buffer has none. Derived from the header rather than
// kept as a member: the forward's saving instance without y then has the kernel parameters and
// code it had before y existed (H200, 2026-12-01: with a y member it was 6 % slower at `train`).
__host__ __device__ inline float* saved_y(const SavedPtrs& sv) {
  if (sv.base == nullptr || (sv.header[11] & kSavedFlagY) == 0) return nullptr;
  const int64_t cells =
      static_cast<int64_t>(sv.header[13]) | (static_cast<int64_t>(sv.header[14]) << 31);
  return reinterpret_cast<float*>(sv.tiles + (cells * sv.tr.bytes + 255) / 256 * 256);
}

// The pointers into a saved buffer at `data` with layout `l`; Internal where saved_y would not
// find the layout's y region (the two must agree: the kernels locate y from the header).
__host__ inline Status saved_ptrs(void* data, const SavedLayout& l, SavedPtrs* out) {
  SavedPtrs p;
  p.base = static_cast<unsigned char*>(data);
  p.decay = reinterpret_cast<float*>(p.base + l.decay);
  p.s_prev = reinterpret_cast<float*>(p.base + l.s_prev);
  p.tiles = p.base + l.tiles;
  p.tr = l.tr;
  for (int i = 0; i < kSavedHeaderInts; ++i) p.header[i] = l.header[i];
  const float* found = saved_y(p);
  const int64_t at = found ? reinterpret_cast<const unsigned char*>(found) - p.base : 0;
  if (at != l.y)
    return Status::Internal("saved: the header locates y at byte " + std::to_string(at) +
                            ", the layout at byte " + std::to_string(l.y) + " (0: none)");
  *out = p;
  return Status::Ok();
}

}  // namespace mamba3::cuda
