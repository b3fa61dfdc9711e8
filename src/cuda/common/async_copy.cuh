// cp.async (sm_80+) global -> shared copies without a register round trip. A copy whose
// `valid` is false writes zeros (src-size 0: nothing is read, the address only has to be a
// legal pointer). Groups: every thread commits the same sequence of groups, then waits until at
// most `n` of its newest groups are still in flight.
#pragma once

#include "cuda/common/mma.cuh"

namespace mamba3::cuda {

// The PTX versions; tests/emu/emu.h has CPU emulations (plain copies, completed at once).
#ifndef MAMBA3_CUDA_EMU
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid = true) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid = true) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(valid ? 4 : 0)
               : "memory");
}

// Asks the L2 to fetch [gmem, gmem + bytes) ahead of the loads that will read it: a hint, no data
// comes to the SM and nothing waits on it. gmem and bytes multiples of 16 (sm_90).
__device__ __forceinline__ void prefetch_l2(const void* gmem, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(gmem), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}
#endif  // MAMBA3_CUDA_EMU

__device__ __forceinline__ void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait<0>();
}

}  // namespace mamba3::cuda
