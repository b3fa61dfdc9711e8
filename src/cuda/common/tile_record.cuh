// What the tensor-core chunk loader produces for one (chunk, head), in the layout both the
// forward (when it saves activations for the backward) and the backward (chunk_state_tc, or the
// forward's saved buffer) store it: the tile record. And the cuda lane's ForwardArgs::saved,
// which holds one record, the chunk-start state and the decay of every (chunk, head).
#pragma once

#include <cstdint>

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

// One chunk's record, byte offsets (16-byte aligned): the rotated biased q and k rows and the
// v * psi rows as the tensor-core loader rounds them (bf16, rows x N | P, dense; rows past the
// chunk zero), the wrapped angles (C x NA fp32) and the scalar arrays (kLoaderScalars x 64 fp32).
// 50 KB at N = 128, P = 64, R = 1, NA = 32, 64-row chunks.
struct TileRecord {
  int q, k, v, th, sc, bytes;
};
__host__ __device__ inline TileRecord tile_record(int N, int P, int rows, int C, int NA) {
  auto up16 = [](int x) { return (x + 15) & ~15; };
  TileRecord r;
  r.q = 0;
  r.k = r.q + rows * N * 2;
  r.v = r.k + rows * N * 2;
  r.th = r.v + rows * P * 2;
  r.sc = r.th + up16(C * NA * 4);
  r.bytes = r.sc + kLoaderScalars * kRecordRows * 4;
  return r;
}

// ForwardArgs::saved of the cuda lane (tensor-core path): a header of kSavedHeaderInts int32,
// then per (chunk, head) cell, cell = chunk id * H + head (chunk ids flat over the sequences, as
// the backward numbers them): the decay exp(cs_last) (fp32), the state at the chunk's start
// (P x N fp32, the initial state for a sequence's first chunk) and the tile record. Offsets in
// bytes, each region 256-byte aligned.
inline constexpr int kSavedHeaderInts = 16;
inline constexpr int32_t kSavedMagicCuda = 0x4d334355;  // "M3CU"
inline constexpr int32_t kSavedVersionCuda = 1;

struct SavedLayout {
  int64_t cells = 0;   // ncu * H
  int64_t decay = 0, s_prev = 0, tiles = 0, bytes = 0;
  TileRecord tr{};
  int32_t header[kSavedHeaderInts] = {};
};

// Everything the layout depends on; ncu is the backward's bound on the chunk count (packed
// sequences: ceil(L / C) + S, else S * ceil(L / C)).
__host__ inline SavedLayout saved_layout(int64_t B, int64_t L, int64_t H, int64_t G, int64_t N,
                                         int64_t P, int64_t R, int64_t NA, int64_t S, bool varlen,
                                         bool interleaved, bool per_rank_out) {
  SavedLayout s;
  const int64_t C = kRecordRows / R;
  const int64_t ncu = varlen ? (L + C - 1) / C + S : S * ((L + C - 1) / C);
  s.cells = ncu * H;
  s.tr = tile_record(static_cast<int>(N), static_cast<int>(P), kRecordRows, static_cast<int>(C),
                     static_cast<int>(NA));
  auto up256 = [](int64_t x) { return (x + 255) / 256 * 256; };
  int64_t o = 256;  // the header
  s.decay = o, o += up256(s.cells * 4);
  s.s_prev = o, o += up256(s.cells * P * N * 4);
  s.tiles = o, o += up256(s.cells * s.tr.bytes);
  s.bytes = o;
  const int32_t h[kSavedHeaderInts] = {
      kSavedMagicCuda, kSavedVersionCuda, static_cast<int32_t>(B), static_cast<int32_t>(L),
      static_cast<int32_t>(H), static_cast<int32_t>(G), static_cast<int32_t>(N),
      static_cast<int32_t>(P), static_cast<int32_t>(R), static_cast<int32_t>(NA),
      static_cast<int32_t>(S), (varlen ? 1 : 0) | (interleaved ? 2 : 0) | (per_rank_out ? 4 : 0),
      static_cast<int32_t>(C), static_cast<int32_t>(s.cells & 0x7fffffff),
      static_cast<int32_t>(s.cells >> 31), static_cast<int32_t>(s.tr.bytes)};
  for (int i = 0; i < kSavedHeaderInts; ++i) s.header[i] = h[i];
  return s;
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

__host__ inline SavedPtrs saved_ptrs(void* data, const SavedLayout& l) {
  SavedPtrs p;
  p.base = static_cast<unsigned char*>(data);
  p.decay = reinterpret_cast<float*>(p.base + l.decay);
  p.s_prev = reinterpret_cast<float*>(p.base + l.s_prev);
  p.tiles = p.base + l.tiles;
  p.tr = l.tr;
  for (int i = 0; i < kSavedHeaderInts; ++i) p.header[i] = l.header[i];
  return p;
}

}  // namespace mamba3::cuda
