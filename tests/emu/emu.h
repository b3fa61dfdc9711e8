// A CPU emulation of the small part of CUDA the backward kernels use, so the kernels in
// src/cuda/chunk_bwd run (slowly) on a machine without a GPU: each CUDA thread of a block is a
// std::thread, __syncthreads is a std::barrier over the block, warp shuffles exchange through a
// per-warp buffer and barrier. Blocks run one after another; dynamic shared memory is a fresh
// heap buffer per block filled with NaN bytes (so a read of an unwritten word shows up), which
// lets AddressSanitizer see out-of-bounds shared and global accesses. Include before any kernel
// header, with MAMBA3_CUDA_EMU defined.
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

#include <barrier>
#include <cmath>
#include <cstdint>
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

struct Warp {
  std::barrier<> bar{32};
  uint64_t slot[32] = {};
};
inline Warp* g_warps = nullptr;

inline int linear_tid() {
  return static_cast<int>(t_thread.x + g_block_dim.x * (t_thread.y + g_block_dim.y * t_thread.z));
}
inline void syncthreads() { g_barrier->arrive_and_wait(); }
inline float* dynamic_smem() { return reinterpret_cast<float*>(g_dynamic); }

template <typename T>
T shfl_xor(T v, int mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const int t = linear_tid(), lane = t % 32;
  Warp& w = g_warps[t / 32];
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  w.slot[lane] = u;
  w.bar.arrive_and_wait();
  const uint64_t r = w.slot[lane ^ mask];
  w.bar.arrive_and_wait();
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

// kernel<<<grid, block, smem>>>(args...), synchronously.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A... args) {
  const unsigned nt = block.x * block.y * block.z;
  if (nt % 32 != 0) throw std::runtime_error("m3emu: block size must be a multiple of 32");
  g_block_dim = block;
  g_grid_dim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(static_cast<std::ptrdiff_t>(nt));
        std::vector<Warp> warps(nt / 32);
        unsigned char* dyn = static_cast<unsigned char*>(std::malloc(smem > 0 ? smem : 1));
        std::memset(dyn, 0xff, smem);
        g_barrier = &bar;
        g_warps = warps.data();
        g_dynamic = smem > 0 ? dyn : nullptr;
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
        std::free(dyn);
      }
}

}  // namespace m3emu

#define threadIdx (::m3emu::t_thread)
#define blockIdx (::m3emu::t_block)
#define blockDim (::m3emu::g_block_dim)
#define gridDim (::m3emu::g_grid_dim)
#define __syncthreads() ::m3emu::syncthreads()
#define __shfl_xor_sync(mask, v, lane_mask) ::m3emu::shfl_xor((v), (lane_mask))
#undef __launch_bounds__
#define __launch_bounds__(...)

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline void __sincosf(float x, float* s, float* c) { sincosf(x, s, c); }
inline float __expf(float x) { return std::exp(x); }
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
