// Warp-level tensor-core helpers (sm_80+ PTX, used on sm_90a): ldmatrix fragment loads and the
// m16n8k16 bf16 MMA with fp32 accumulation. Fragment layouts (g = lane / 4, t = lane % 4):
//   A 16x16: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8:  b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8.., n = g)
//   C 16x8:  c0, c1 (g, 2t, 2t+1), c2, c3 (g+8, 2t, 2t+1)
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace mamba3::cuda {

// The four PTX primitives below have CPU emulations in tests/emu/emu.h (the emulated backward
// tests compile these headers as plain C++); the helpers after them are shared.
#ifndef MAMBA3_CUDA_EMU
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // MAMBA3_CUDA_EMU

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 8 bf16 (16 bytes, element 0 in the low half of x) to fp32 and back (round to nearest even).
__device__ __forceinline__ void bf16x8_to_float(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ uint4 float8_to_bf16x8(const float (&f)[8]) {
  return make_uint4(pack_bf16(f[0], f[1]), pack_bf16(f[2], f[3]), pack_bf16(f[4], f[5]),
                    pack_bf16(f[6], f[7]));
}

// A-operand 16x16 tile at (row0, k0) of a row-major bf16 matrix with `pitch` elements per row.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const __nv_bfloat16* base, int pitch,
                                       int row0, int k0, int lane) {
  ldmatrix_x4(a, base + (row0 + (lane & 15)) * pitch + k0 + (lane >> 4) * 8);
}

// A-operand 16x16 tile of X^T where X is row-major [k][m]: A[m][k] = X[k0 + k][m0 + m].
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const __nv_bfloat16* base,
                                             int pitch, int m0, int k0, int lane) {
  ldmatrix_x4_trans(a, base + (k0 + (lane & 7) + ((lane >> 4) << 3)) * pitch + m0 +
                           ((lane >> 3) & 1) * 8);
}

// B-operands of two 8-wide n-tiles (n0, n0 + 8) for k-tile k0, from Y row-major [n][k]
// (B[k][n] = Y[n][k], e.g. K for Q K^T): b[0], b[1] for n0; b[2], b[3] for n0 + 8.
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const __nv_bfloat16* base, int pitch,
                                          int n0, int k0, int lane) {
  ldmatrix_x4(b, base + (n0 + (lane & 7) + ((lane >> 4) << 3)) * pitch + k0 +
                     ((lane >> 3) & 1) * 8);
}

// B-operands of two n-tiles (n0, n0 + 8) for k-tile k0, from X row-major [k][n] (e.g. V for
// A V): b[0], b[1] for n0; b[2], b[3] for n0 + 8.
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const __nv_bfloat16* base, int pitch,
                                          int n0, int k0, int lane) {
  ldmatrix_x4_trans(b, base + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * pitch + n0 +
                           (lane >> 4) * 8);
}

}  // namespace mamba3::cuda
