// Hopper data movement and matrix instructions (sm_90a PTX; DESIGN.md §3):
//   - mbarriers: a CTA-wide barrier object in shared memory that completes a phase when its
//     expected arrivals and expected transaction bytes have all come in;
//   - TMA: cp.async.bulk.tensor copies a box of a global tensor (a CUtensorMap built on the host
//     from a checked TmaView, tma_host.h) into shared memory and reports its bytes to an
//     mbarrier;
//   - wgmma: a warpgroup (4 consecutive warps) multiplies a 64 x 16 A tile (shared memory or
//     registers) by a 16 x 64 B tile in shared memory into fp32 accumulators in registers,
//     asynchronously (commit / wait groups).
// Shared-memory operands use the 128-byte swizzle (tma_view.h, swizzle128) on 1024-byte aligned
// tiles: K-major A / B as rows of 64 bf16 (one swizzle row), MN-major B (B[k][n] with n
// contiguous) as rows of 64 n values.
//
// Register layouts (g = lane / 4, t = lane % 4, warp w of the warpgroup owns rows 16w..16w+15):
//   accumulator m64n64: d[4j + 0], d[4j + 1] = (16w + g, 8j + 2t, +1); d[4j + 2], d[4j + 3] =
//     (16w + g + 8, 8j + 2t, +1)  (mma.sync's C layout, 8 column tiles);
//   register A m64k16: a0..a3 as mma.sync's A fragment of rows 16w.. (mma.cuh).
// So a warp's accumulator columns 16i..16i+15 convert to the register A of a k16 step (bf16
// pairs), as in the chunk products' "scores then scores x V".
//
// tests/emu/emu.h emulates every primitive here (the copy engine as an immediate copy with the
// swizzle, wgmma as per-thread dot products read through the descriptors).
#pragma once

#include "cuda/common/mma.cuh"
#include "cuda/common/tma_view.h"

#ifndef MAMBA3_CUDA_EMU
#include <cuda.h>  // CUtensorMap (the type only; nothing is linked from the driver)
#endif

namespace mamba3::cuda {

#ifndef MAMBA3_CUDA_EMU
using TmaMap = CUtensorMap;

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count)
               : "memory");
}

// After the initializing thread's mbar_init, before other threads or the copy engine use it.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also expects `bytes` more transaction bytes in the current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

// Waits until the phase with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "MBAR_WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra MBAR_WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// The box at coordinates (c0..c3, innermost first) of a rank-4 view into shared memory at dst
// (1024-byte aligned under the 128-byte swizzle); completes on `bar` with box_bytes bytes.
// Elements outside the view are zero.
__device__ __forceinline__ void tma_load_4d(void* dst, const TmaMap* map, int c0, int c1, int c2,
                                            int c3, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(smem_addr(bar))
      : "memory");
}

// The same for a rank-5 view.
__device__ __forceinline__ void tma_load_5d(void* dst, const TmaMap* map, int c0, int c1, int c2,
                                            int c3, int c4, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4),
      "r"(smem_addr(bar))
      : "memory");
}

// Expects `bytes` more transaction bytes in the current phase, without an arrival.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

// Orders this thread's earlier generic shared-memory writes before later async-proxy reads
// (wgmma operands, TMA stores) of them.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

#define MAMBA3_WGMMA_D32                                                                          \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),            \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),     \
      "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),  \
      "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),  \
      "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define MAMBA3_WGMMA_REGS32                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"

// d (+)= A B, m64n64k16, bf16 operands, fp32 accumulators; A and B from shared memory through
// descriptors (A K-major; B K-major, or MN-major with kTransB). accumulate = false: d = A B.
template <bool kTransB>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a,
                                                   uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred acc;\n"
      "setp.ne.b32 acc, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " MAMBA3_WGMMA_REGS32
      ", %32, %33, acc, 1, 1, 0, %35;\n"
      "}\n"
      : MAMBA3_WGMMA_D32
      : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)), "n"(kTransB ? 1 : 0));
}

// The same with A from registers (a0..a3 in mma.sync's A fragment layout of the warp's rows).
template <bool kTransB>
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32], const uint32_t (&a)[4],
                                                   uint64_t desc_b, bool accumulate) {
  asm volatile(
      "{\n"
      ".reg .pred acc;\n"
      "setp.ne.b32 acc, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " MAMBA3_WGMMA_REGS32
      ", {%32, %33, %34, %35}, %36, acc, 1, 1, %38;\n"
      "}\n"
      : MAMBA3_WGMMA_D32
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(static_cast<int>(accumulate)),
        "n"(kTransB ? 1 : 0));
}
#undef MAMBA3_WGMMA_D32
#undef MAMBA3_WGMMA_REGS32
#endif  // MAMBA3_CUDA_EMU

// The shared-memory matrix descriptor of a 128-byte swizzled operand whose 8-row groups lie
// 1024 bytes apart (K-major: rows of 64 bf16 along k; MN-major: rows of 64 bf16 along m or n,
// one row per k): start address >> 4 (bits 0-13), leading byte offset (bits 16-29; unused
// here: one swizzle span covers the operand's k16 (K-major) or 64 columns (MN-major)), stride
// byte offset 1024 >> 4 (bits 32-45), layout 1 = 128-byte swizzle (bits 62-63). A K-major
// operand's k16 step s inside the span starts 32 s bytes further; an MN-major one's 16 rows
// (2048 bytes) further.
__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void* p) {
  const uint64_t a = smem_addr(p);
  return ((a & 0x3FFFFu) >> 4) | (uint64_t{1} << 16) | (uint64_t{64} << 32) | (uint64_t{1} << 62);
}

// Shared-memory byte offset of element (row, col) of a swizzled tile of rows of 64 bf16 (128
// bytes), col < 64: tiles wider than 64 columns are stored as consecutive 64-column panels.
__device__ __forceinline__ uint32_t sw128_off(int row, int col) {
  return swizzle128(static_cast<uint32_t>(row) * 128u + static_cast<uint32_t>(col) * 2u);
}

}  // namespace mamba3::cuda
