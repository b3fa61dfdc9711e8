// A CPU emulation of the small part of CUDA the backward, decode-step and tensor-core forward
// kernels use, so the kernels in src/cuda/chunk_bwd, src/cuda/step and src/cuda/chunk_fwd_tc run
// (slowly) on a machine without a GPU: each CUDA thread of a block is a std::thread,
// __syncthreads is a std::barrier over the block, warp shuffles exchange through a per-warp
// buffer and barrier, and so do the tensor-core instructions of the bf16 kernels (ldmatrix x4 /
// x4.trans and mma.sync m16n8k16 bf16 -> fp32, with the fragment layouts of
// src/cuda/common/mma.cuh; ldmatrix checks that its row addresses are 16-byte aligned and inside
// dynamic shared memory); cp.async is a plain copy that completes at once (checked the same way). Blocks run one after another; dynamic shared memory is a fresh
// heap buffer per block filled with NaN bytes (so a read of an unwritten word shows up), which
// lets AddressSanitizer see out-of-bounds shared and global accesses. A kernel that declares its
// dynamic shared memory as `extern __shared__ T name[]` (no emulation guard; on the host that
// names a namespace-scope array) runs on that array instead, defined by the test and bound to
// the kernel with bind_dynamic_smem: NaN-filled per block like the heap buffer, its bytes past
// the launch's size poisoned for AddressSanitizer. Include before any kernel header, with
// MAMBA3_CUDA_EMU defined.
//
// The fast-math intrinsics (__expf, __sincosf, __fdividef, rsqrtf) and the libm functions the
// kernels call (expf, tanhf) use the host's libm here: close, not bit-exact to the device's
// approximations, so emulated results are not the GPU's bits (hashes compare emulated runs).
//
// Not a simulator of timing or of the memory model: races that real hardware would expose can
// pass here; compute-sanitizer racecheck on the device remains the check for those.
#pragma once

#ifndef MAMBA3_CUDA_EMU
#error "define MAMBA3_CUDA_EMU before including tests/emu/emu.h"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include <sanitizer/asan_interface.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

namespace m3emu {

inline thread_local dim3 t_thread, t_block;
inline dim3 g_block_dim, g_grid_dim;
inline std::barrier<>* g_barrier = nullptr;
inline unsigned char* g_dynamic = nullptr;
inline size_t g_dynamic_bytes = 0;

struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[32] = {};
  const void* addr[32] = {};      // ldmatrix row addresses
  uint32_t frag[32][6] = {};      // mma.sync operands: a0..a3, b0, b1
};
inline Warp* g_warps = nullptr;

inline int linear_tid() {
  return static_cast<int>(t_thread.x + g_block_dim.x * (t_thread.y + g_block_dim.y * t_thread.z));
}
inline void syncthreads() { g_barrier->arrive_and_wait(); }
inline float* dynamic_smem() { return reinterpret_cast<float*>(g_dynamic); }

// A warp shuffle: every lane gets the value of lane src(lane).
template <typename T, typename FS>
T shfl_from(T v, FS src) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const int t = linear_tid(), lane = t % 32;
  Warp& w = g_warps[t / 32];
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  w.slot[lane] = u;
  w.bar.arrive_and_wait();
  const uint64_t r = w.slot[src(lane)];
  w.bar.arrive_and_wait();
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}
// The width argument of the shuffles splits the warp into segments of `width` lanes (a power of
// two); a lane reads only inside its own segment.
template <typename T>
T shfl_xor(T v, int mask, int width = 32) {
  return shfl_from(v, [mask, width](int lane) {
    const int src = lane ^ mask;
    return (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane;
  });
}
// __shfl_up_sync: lanes whose index inside the segment is below delta keep their own value.
template <typename T>
T shfl_up(T v, int delta, int width = 32) {
  return shfl_from(v, [delta, width](int lane) {
    return (lane & (width - 1)) >= delta ? lane - delta : lane;
  });
}
// __shfl_down_sync: lanes whose index inside the segment plus delta leaves it keep their own value.
template <typename T>
T shfl_down(T v, int delta, int width = 32) {
  return shfl_from(v, [delta, width](int lane) {
    return (lane & (width - 1)) + delta < width ? lane + delta : lane;
  });
}
// __shfl_sync: lane src of the segment.
template <typename T>
T shfl_idx(T v, int src, int width = 32) {
  return shfl_from(v, [src, width](int lane) { return (lane & ~(width - 1)) + (src & (width - 1)); });
}

inline void syncwarp() { g_warps[linear_tid() / 32].bar.arrive_and_wait(); }

inline void fail(const char* what) {
  std::fprintf(stderr, "m3emu: %s\n", what);
  std::abort();
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses
// (16-byte aligned, in dynamic shared memory) of 8x8 matrix i; r[i] of lane l holds, of matrix
// i, row l/4, columns 2(l%4), 2(l%4)+1 (low half first), or with .trans column l/4, rows
// 2(l%4), 2(l%4)+1.
inline void ldmatrix(uint32_t (&r)[4], const void* p, bool trans) {
  const int lane = linear_tid() % 32;
  Warp& w = g_warps[linear_tid() / 32];
  const auto* c = static_cast<const unsigned char*>(p);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  if (g_dynamic == nullptr || c < g_dynamic || c + 16 > g_dynamic + g_dynamic_bytes)
    fail("ldmatrix row address outside dynamic shared memory");
  w.addr[lane] = p;
  w.bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    uint16_t h[2];
    for (int e = 0; e < 2; ++e) {
      const int k = 2 * (lane % 4) + e;
      const auto* row = static_cast<const uint16_t*>(w.addr[8 * i + (trans ? k : lane / 4)]);
      h[e] = row[trans ? lane / 4 : k];
    }
    r[i] = static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
  }
  w.bar.arrive_and_wait();
}

inline float bf16_bits(uint32_t u) {
  const uint32_t f = (u & 0xffffu) << 16;
  float x;
  std::memcpy(&x, &f, sizeof x);
  return x;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 with the fragment layouts of
// src/cuda/common/mma.cuh (g = lane / 4, t = lane % 4): A a0 (g, 2t..2t+1), a1 (g+8, 2t..),
// a2 (g, 2t+8..), a3 (g+8, 2t+8..); B b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g); C c0,
// c1 (g, 2t, 2t+1), c2, c3 (g+8, ..). The bf16 products are exact in fp32; they are added to the
// accumulator one k at a time in fp32.
inline void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int lane = linear_tid() % 32, g = lane / 4, t = lane % 4;
  Warp& w = g_warps[linear_tid() / 32];
  for (int i = 0; i < 4; ++i) w.frag[lane][i] = a[i];
  w.frag[lane][4] = b0, w.frag[lane][5] = b1;
  w.bar.arrive_and_wait();
  auto A = [&](int row, int k) {
    const int reg = (row >= 8) + 2 * (k >= 8);
    const uint32_t u = w.frag[(row % 8) * 4 + (k % 8) / 2][reg];
    return bf16_bits(k % 2 ? u >> 16 : u);
  };
  auto B = [&](int k, int n) {
    const uint32_t u = w.frag[n * 4 + (k % 8) / 2][4 + (k >= 8)];
    return bf16_bits(k % 2 ? u >> 16 : u);
  };
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >> 1) * 8, col = 2 * t + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[e] = acc;
  }
  w.bar.arrive_and_wait();
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

// The largest dynamic shared memory of a block (sm_90): the size of a bound array.
inline constexpr size_t kMaxDynamicSmem = 232448;

// Arrays bound as the dynamic shared memory of kernels that declare it `extern __shared__`.
struct BoundSmem {
  const void* kernel;
  unsigned char* array;
  size_t bytes;
};
inline std::vector<BoundSmem> g_bound;

template <typename... P>
void bind_dynamic_smem(void (*kernel)(P...), void* array, size_t bytes) {
  const void* k = reinterpret_cast<const void*>(kernel);
  auto* a = static_cast<unsigned char*>(array);
  for (BoundSmem& b : g_bound)
    if (b.kernel == k) {
      b.array = a, b.bytes = bytes;
      return;
    }
  g_bound.push_back({k, a, bytes});
}

// kernel<<<grid, block, smem>>>(args...), synchronously.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A... args) {
  const unsigned nt = block.x * block.y * block.z;
  if (nt % 32 != 0) throw std::runtime_error("m3emu: block size must be a multiple of 32");
  const auto bound = std::find_if(g_bound.begin(), g_bound.end(), [&](const BoundSmem& b) {
    return b.kernel == reinterpret_cast<const void*>(kernel);
  });
  if (bound != g_bound.end() && smem > bound->bytes)
    fail("dynamic shared memory larger than the array bound to the kernel");
  g_block_dim = block;
  g_grid_dim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(static_cast<std::ptrdiff_t>(nt));
        std::vector<Warp> warps(nt / 32);
        unsigned char* dyn = nullptr;
        if (bound != g_bound.end()) {
          dyn = bound->array;
          ASAN_UNPOISON_MEMORY_REGION(dyn, bound->bytes);
          ASAN_POISON_MEMORY_REGION(dyn + smem, bound->bytes - smem);
        } else {
          dyn = static_cast<unsigned char*>(std::malloc(smem > 0 ? smem : 1));
        }
        std::memset(dyn, 0xff, smem);
        g_barrier = &bar;
        g_warps = warps.data();
        g_dynamic = smem > 0 ? dyn : nullptr;
        g_dynamic_bytes = smem;
        std::vector<std::thread> threads;
        threads.reserve(nt);
        for (unsigned t = 0; t < nt; ++t)
          threads.emplace_back([&, t] {
            t_block = dim3(bx, by, bz);
            t_thread = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            kernel(args...);
            // A thread that returns early still takes part in later barriers of its block.
            bar.arrive_and_drop();
            warps[t / 32].bar.arrive_and_drop();
          });
        for (auto& th : threads) th.join();
        if (bound != g_bound.end())
          ASAN_UNPOISON_MEMORY_REGION(dyn, bound->bytes);
        else
          std::free(dyn);
      }
}

}  // namespace m3emu

#define threadIdx (::m3emu::t_thread)
#define blockIdx (::m3emu::t_block)
#define blockDim (::m3emu::g_block_dim)
#define gridDim (::m3emu::g_grid_dim)
#define __syncthreads() ::m3emu::syncthreads()
#define __shfl_xor_sync(mask, v, ...) ::m3emu::shfl_xor((v), __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) ::m3emu::shfl_up((v), __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) ::m3emu::shfl_down((v), __VA_ARGS__)
#define __shfl_sync(mask, v, ...) ::m3emu::shfl_idx((v), __VA_ARGS__)
#define __syncwarp(...) ::m3emu::syncwarp()
#undef __launch_bounds__
#define __launch_bounds__(...)
// The CUDA headers define __noinline__ only for a CUDA compiler (libstdc++ spells the attribute
// __attribute__((__noinline__)), which an empty expansion leaves valid).
#ifndef __noinline__
#define __noinline__
#endif

// The device's integer min / max (global functions of the CUDA math library).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
// Streaming (evict-first) load: a plain load here.
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
// Streaming (evict-first) store: a plain store here.
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
// The fast-math intrinsics through the host's libm (not bit-exact to the device; see the top).
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline void __sincosf(float x, float* s, float* c) { sincosf(x, s, c); }
inline float __expf(float x) { return std::exp(x); }
// As on the device, 0 for 2^126 < |y| (the device multiplies by an approximate reciprocal).
inline float __fdividef(float x, float y) { return std::fabs(y) > 0x1p126f ? x * 0.f : x / y; }
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The tensor-core primitives of src/cuda/common/mma.cuh (which compiles its PTX versions only
// without MAMBA3_CUDA_EMU).
namespace mamba3::cuda {
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ::m3emu::ldmatrix(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ::m3emu::ldmatrix(r, p, true); }
inline void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ::m3emu::mma_bf16(c, a, b0, b1);
}

// cp.async (src/cuda/common/async_copy.cuh) as a plain copy that completes at once, so commit
// and wait have nothing to do; an invalid copy writes zeros. The destination must lie inside
// dynamic shared memory and be aligned to the copy size, as on the device.
template <size_t kBytes>
inline void cp_async_emu(void* smem, const void* gmem, bool valid) {
  auto* d = static_cast<unsigned char*>(smem);
  if (reinterpret_cast<uintptr_t>(smem) % kBytes != 0 ||
      reinterpret_cast<uintptr_t>(gmem) % kBytes != 0)
    ::m3emu::fail("cp.async address not aligned to the copy size");
  if (::m3emu::g_dynamic == nullptr || d < ::m3emu::g_dynamic ||
      d + kBytes > ::m3emu::g_dynamic + ::m3emu::g_dynamic_bytes)
    ::m3emu::fail("cp.async destination outside dynamic shared memory");
  if (valid)
    std::memcpy(smem, gmem, kBytes);
  else
    std::memset(smem, 0, kBytes);
}
inline void cp_async16(void* smem, const void* gmem, bool valid = true) {
  cp_async_emu<16>(smem, gmem, valid);
}
inline void cp_async4(void* smem, const void* gmem, bool valid = true) {
  cp_async_emu<4>(smem, gmem, valid);
}
inline void prefetch_l2(const void*, uint32_t) {}  // a hint: nothing to emulate
inline void cp_async_commit() {}
template <int kPending>
inline void cp_async_wait() {}
}  // namespace mamba3::cuda

// ---- The Hopper primitives of src/cuda/common/tma.cuh.
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>

#include "cuda/common/tma_view.h"

namespace m3emu {

// Byte offset of p inside the block's dynamic shared memory (the emulated shared-window
// address; the window is taken as 1024-byte aligned, as the kernels align their swizzled tiles).
inline uint32_t smem_offset(const void* p, size_t bytes, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (g_dynamic == nullptr || c < g_dynamic || c + bytes > g_dynamic + g_dynamic_bytes) fail(what);
  return static_cast<uint32_t>(c - g_dynamic);
}

// mbarriers by their shared-memory offset (per block: cleared by mbar_init): arrivals still
// expected in the current phase, transaction bytes still expected, completed phases.
struct Mbar {
  uint32_t count = 0, arrivals_left = 0, phases = 0;
  int64_t tx = 0;
};
inline std::mutex g_mbar_mutex;
inline std::map<uint32_t, Mbar> g_mbars;

inline void mbar_maybe_complete(Mbar& b) {
  if (b.arrivals_left == 0 && b.tx == 0) ++b.phases, b.arrivals_left = b.count;
}
inline Mbar& mbar_of(uint64_t* bar) {
  const uint32_t off = smem_offset(bar, 8, "mbarrier outside dynamic shared memory");
  if (off % 8 != 0) fail("mbarrier not 8-byte aligned");
  const auto it = g_mbars.find(off);
  if (it == g_mbars.end()) fail("mbarrier used before mbar_init");
  return it->second;
}

}  // namespace m3emu

namespace mamba3::cuda {

// A tensor map as the emulation reads it: the checked view and its global base.
struct TmaMap {
  TmaView view;
  const void* base = nullptr;
};

inline uint32_t smem_addr(const void* p) {
  return ::m3emu::smem_offset(p, 1, "shared address outside dynamic shared memory");
}

inline void mbar_init(uint64_t* bar, uint32_t count) {
  const uint32_t off = ::m3emu::smem_offset(bar, 8, "mbarrier outside dynamic shared memory");
  std::lock_guard<std::mutex> lk(::m3emu::g_mbar_mutex);
  ::m3emu::Mbar& b = ::m3emu::g_mbars[off];
  b = ::m3emu::Mbar{};
  b.count = b.arrivals_left = count;
}
inline void mbar_init_fence() {}
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  std::lock_guard<std::mutex> lk(::m3emu::g_mbar_mutex);
  ::m3emu::Mbar& b = ::m3emu::mbar_of(bar);
  if (b.arrivals_left == 0) ::m3emu::fail("mbarrier: more arrivals than its count");
  b.tx += bytes;
  --b.arrivals_left;
  ::m3emu::mbar_maybe_complete(b);
}
// Spins (other emulated threads make progress meanwhile); a phase that never completes fails
// after 60 s instead of hanging the test.
inline void mbar_wait(uint64_t* bar, uint32_t parity) {
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    {
      std::lock_guard<std::mutex> lk(::m3emu::g_mbar_mutex);
      if ((::m3emu::mbar_of(bar).phases & 1u) != (parity & 1u)) return;
    }
    if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(60))
      ::m3emu::fail("mbarrier wait: the phase never completed");
    std::this_thread::yield();
  }
}

// The copy engine's box copy, done at once: zero outside the view, the 128-byte swizzle on the
// destination offsets, then the bytes are reported to the mbarrier. Views of rank 4 or 5.
inline void tma_load(void* dst, const TmaMap* map, const int (&c)[5], int rank, uint64_t* bar) {
  const TmaView& v = map->view;
  if (v.rank != rank) ::m3emu::fail("TMA copy of a view of another rank");
  const uint32_t bytes = v.box_bytes();
  const uint32_t off = ::m3emu::smem_offset(dst, bytes, "TMA box outside dynamic shared memory");
  if (off % (v.swizzle == 128 ? 1024 : 128) != 0)
    ::m3emu::fail("TMA destination not aligned (128 bytes; 1024 under the 128-byte swizzle)");
  const int eb = v.elem_bytes;
  const uint32_t b4 = rank == 5 ? v.box[4] : 1;
  uint32_t lin = 0;
  for (uint32_t i4 = 0; i4 < b4; ++i4)
  for (uint32_t i3 = 0; i3 < v.box[3]; ++i3)
    for (uint32_t i2 = 0; i2 < v.box[2]; ++i2)
      for (uint32_t i1 = 0; i1 < v.box[1]; ++i1)
        for (uint32_t i0 = 0; i0 < v.box[0]; ++i0, lin += eb) {
          const int64_t x[5] = {int64_t{c[0]} + i0, int64_t{c[1]} + i1, int64_t{c[2]} + i2,
                                int64_t{c[3]} + i3, int64_t{c[4]} + i4};
          bool in = true;
          for (int d = 0; d < rank; ++d) in = in && x[d] >= 0 && static_cast<uint64_t>(x[d]) < v.dim[d];
          unsigned char* to = ::m3emu::g_dynamic + (v.swizzle == 128 ? swizzle128(off + lin) : off + lin);
          if (in)
            std::memcpy(to, static_cast<const unsigned char*>(map->base) + tma_view_offset(v, x), eb);
          else
            std::memset(to, 0, eb);
        }
  std::lock_guard<std::mutex> lk(::m3emu::g_mbar_mutex);
  ::m3emu::Mbar& b = ::m3emu::mbar_of(bar);
  b.tx -= bytes;
  ::m3emu::mbar_maybe_complete(b);
}
inline void tma_load_4d(void* dst, const TmaMap* map, int c0, int c1, int c2, int c3,
                        uint64_t* bar) {
  tma_load(dst, map, {c0, c1, c2, c3, 0}, 4, bar);
}
inline void tma_load_5d(void* dst, const TmaMap* map, int c0, int c1, int c2, int c3, int c4,
                        uint64_t* bar) {
  tma_load(dst, map, {c0, c1, c2, c3, c4}, 5, bar);
}
inline void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  std::lock_guard<std::mutex> lk(::m3emu::g_mbar_mutex);
  ::m3emu::mbar_of(bar).tx += bytes;
}

inline void fence_proxy_async() {}
inline void wgmma_fence() {}
inline void wgmma_commit() {}
template <int kPending>
inline void wgmma_wait() {}

}  // namespace mamba3::cuda

namespace m3emu {

// Element (row, col) of a 128-byte swizzled operand through a wgmma descriptor: row `row` of
// 64 bf16 lies at start + (row / 8) * SBO + (row % 8) * 128 (swizzled on the absolute offset).
inline float wgmma_operand(uint64_t desc, int row, int col) {
  if ((desc >> 62) != 1) fail("wgmma descriptor: only the 128-byte swizzle is emulated");
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFFu) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFFu) << 4;
  if (col < 0 || col >= 64) fail("wgmma operand column outside the swizzle span");
  const uint32_t lin = start + static_cast<uint32_t>(row / 8) * sbo + (row % 8) * 128u + col * 2u;
  const uint32_t at = mamba3::cuda::swizzle128(lin);
  if (g_dynamic == nullptr || at + 2 > g_dynamic_bytes) fail("wgmma operand outside dynamic shared memory");
  uint16_t h;
  std::memcpy(&h, g_dynamic + at, 2);
  return bf16_bits(h);
}

// d (+)= A B for the calling thread's accumulator elements (tma.cuh's layout); A(row, k) from
// `a_at`, B(k, n) through descriptor `db` (K-major: B stored [n][k]; MN-major: [k][n]). Each
// output is a fp32 sum over k = 0..15 in order, added to the accumulator like mma_bf16.
template <typename FA>
inline void wgmma_m64n64k16(float (&d)[32], FA a_at, uint64_t db, bool trans_b, bool accumulate) {
  const int t = linear_tid(), lane = t % 32, w = (t / 32) % 4, g = lane / 4, q = lane % 4;
  float out[32];
  for (int j = 0; j < 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * w + g + (e >> 1) * 8, col = 8 * j + 2 * q + (e & 1);
      float acc = accumulate ? d[4 * j + e] : 0.f;
      for (int k = 0; k < 16; ++k)
        acc += a_at(row, k) * (trans_b ? wgmma_operand(db, k, col) : wgmma_operand(db, col, k));
      out[4 * j + e] = acc;
    }
  for (int i = 0; i < 32; ++i) d[i] = out[i];
}

}  // namespace m3emu

namespace mamba3::cuda {

template <bool kTransB>
inline void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  ::m3emu::wgmma_m64n64k16(
      d, [&](int row, int k) { return ::m3emu::wgmma_operand(desc_a, row, k); }, desc_b, kTransB,
      accumulate);
}

// A from registers: the warp's fragments exchanged like mma_bf16's (rows 16w.. of warp w).
template <bool kTransB>
inline void wgmma_m64n64k16_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                               bool accumulate) {
  const int lane = ::m3emu::linear_tid() % 32;
  ::m3emu::Warp& w = ::m3emu::g_warps[::m3emu::linear_tid() / 32];
  for (int i = 0; i < 4; ++i) w.frag[lane][i] = a[i];
  w.bar.arrive_and_wait();
  auto A = [&](int row, int k) {
    const int r = row % 16;
    const int reg = (r >= 8) + 2 * (k >= 8);
    const uint32_t u = w.frag[(r % 8) * 4 + (k % 8) / 2][reg];
    return ::m3emu::bf16_bits(k % 2 ? u >> 16 : u);
  };
  ::m3emu::wgmma_m64n64k16(d, A, desc_b, kTransB, accumulate);
  w.bar.arrive_and_wait();
}

}  // namespace mamba3::cuda
