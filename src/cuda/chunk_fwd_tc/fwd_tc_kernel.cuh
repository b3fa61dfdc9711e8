// Chunked prefill forward on the tensor cores (mma.sync m16n8k16, bf16 operands, fp32
// accumulation) for bf16/fp16 inputs. One CTA of 4 warps per (sequence, head) walks its chunks
// of kTcRows = 64 rows (C = 64 / R tokens, row t*R + r); warp w owns rows 16w..16w+15:
//   scores = Q K^T (fp32 fragments) -> mask -> bf16 A fragments kept in registers
//   Y      = A V + diag(exp(cs)) Q S^T            (to shared memory, fp32)
//   S      = exp(cs_last) S + (fw V)^T K          (fp32 master copy in shared memory)
// Rounded to bf16 on the way (DESIGN.md §2.6): rotated q and k, v*psi, the masked scores, the
// state as the operand of Q S^T, and fw*v. The state itself and every sum stay fp32.
// The output stage (D, norm, gate, rank reduction) reads Y from shared memory.
#pragma once

#include "cuda/common/mma.cuh"
#include "cuda/common/layer_io.cuh"

namespace mamba3::cuda {

inline constexpr int kTcThreads = 128;
inline constexpr int kTcRows = 64;

template <int N, int P>
struct TcLayout {
  // P = 64: each warp owns 16 rows of the state as MMA accumulators in registers (no fp32 copy
  // in shared memory), which with the angle table brings the CTA under half the shared memory
  // of an SM: two CTAs per SM.
  static constexpr bool kStateInRegs = P == 64;
  static constexpr int kQp = N + 8;   // bf16 pitches padded by 16 bytes: conflict-free ldmatrix
  static constexpr int kVp = P + 8;
  static constexpr int kSfp = N + 4;  // fp32 pitches
  static constexpr int kYp = P + 4;
  // byte offsets
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kTcRows * kQp * 2;
  static constexpr int kV = kK + kTcRows * kQp * 2;
  static constexpr int kVw = kV + kTcRows * kVp * 2;
  static constexpr int kSs = kVw + kTcRows * kVp * 2;
  static constexpr int kSf = kSs + P * kQp * 2;
  static constexpr int kY = kSf + (kStateInRegs ? 0 : P * kSfp * 4);  // also the angle table
  static constexpr int kYBytes = kTcRows * kYp * 4 > kTcRows * 64 * 4 ? kTcRows * kYp * 4
                                                                       : kTcRows * 64 * 4;
  static constexpr int kScal = kY + kYBytes;        // cs, ex, gam, w, fw, rstd (64 floats each)
  static constexpr int kTheta = kScal + 6 * kTcRows * 4;  // running angles, float64 (<= 64)
  static constexpr int kPar = kTheta + 64 * 8;  // psi, zeta, phi (8 x P each, R <= 8), w (P)
  static constexpr int kBytes = kPar + (3 * 8 * P + P) * 4;
  static_assert(kBytes <= 227 * 1024, "tensor-core forward exceeds shared memory");
  static_assert(kQ % 16 == 0 && kK % 16 == 0 && kV % 16 == 0 && kVw % 16 == 0 && kSs % 16 == 0 &&
                    kSf % 16 == 0 && kY % 16 == 0 && kTheta % 8 == 0,
                "shared-memory regions must stay 16-byte aligned");
};

// 8 bf16 (one 16-byte load) to floats.
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

__device__ __forceinline__ uint4 ldg16(const void* ptr) {
  return __ldg(reinterpret_cast<const uint4*>(ptr));
}

// Rotated, biased q and k rows of one chunk into bf16 tiles from 16-byte loads: every load of
// a thread is issued before any is used. Interleaved pairs sit inside one 8-element chunk;
// halved pairs (i, i + N/2) take a chunk of each half.
template <int N, bool kInterleaved>
__device__ __forceinline__ void load_qk_tiles_vec(const CoreParams& p, int b, int h, int g,
                                                  int l0, int R, int mr, const float* thv,
                                                  __nv_bfloat16* Qs,
                                                  __nv_bfloat16* Ks, int pitch, int tid) {
  constexpr int kChunks = N / 8;
  constexpr int kPerRow = kInterleaved ? kChunks : kChunks / 2;
  constexpr int kItAll = kTcRows * kPerRow / kTcThreads;
  // Loads in batches of at most 4 items per thread: enough bytes in flight, and a bounded
  // register footprint next to the state accumulators.
  constexpr int kIt = kItAll < 4 ? kItAll : 4;
  constexpr int kParts = kInterleaved ? 1 : 2;
  const int NA = p.NA, half = N / 2;
#pragma unroll 1
  for (int u0 = 0; u0 < kItAll; u0 += kIt) {
  uint4 qa[kIt][kParts], ka[kIt][kParts];
#pragma unroll
  for (int u = 0; u < kIt; ++u) {
    const int it = (u0 + u) * kTcThreads + tid, row = it / kPerRow, c = it % kPerRow;
    if (row < mr) {
      const int t = row / R, r = row % R;
      const __nv_bfloat16* qr =
          static_cast<const __nv_bfloat16*>(p.q.data) + qk_off(p.q, b, l0 + t, r, g, 0);
      const __nv_bfloat16* kr =
          static_cast<const __nv_bfloat16*>(p.k.data) + qk_off(p.k, b, l0 + t, r, g, 0);
#pragma unroll
      for (int part = 0; part < kParts; ++part) {
        qa[u][part] = ldg16(qr + part * half + c * 8);
        ka[u][part] = ldg16(kr + part * half + c * 8);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < kIt; ++u) {
    const int it = (u0 + u) * kTcThreads + tid, row = it / kPerRow, c = it % kPerRow;
    const int t = row / R, r = row % R;
    float q[kParts][8], k[kParts][8];
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      if (row < mr) {
        bf16x8_to_float(qa[u][part], q[part]);
        bf16x8_to_float(ka[u][part], k[part]);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int n = part * half + c * 8 + e;
          q[part][e] += dload_ro(p.q_bias, bias_off(p.q_bias, h, r, n));
          k[part][e] += dload_ro(p.k_bias, bias_off(p.k_bias, h, r, n));
        }
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) q[part][e] = k[part][e] = 0.f;
      }
    }
    if (row < mr) {
      const float* th_t = thv + t * NA;
      if (kInterleaved) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = c * 4 + e;
          if (i < NA) {
            float si, co;
            __sincosf(th_t[i], &si, &co);
            const float qa0 = q[0][2 * e], qb0 = q[0][2 * e + 1];
            const float ka0 = k[0][2 * e], kb0 = k[0][2 * e + 1];
            q[0][2 * e] = qa0 * co - qb0 * si, q[0][2 * e + 1] = qa0 * si + qb0 * co;
            k[0][2 * e] = ka0 * co - kb0 * si, k[0][2 * e + 1] = ka0 * si + kb0 * co;
          }
        }
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int i = c * 8 + e;
          if (i < NA) {
            float si, co;
            __sincosf(th_t[i], &si, &co);
            const float q0 = q[0][e], q1 = q[kParts - 1][e], k0 = k[0][e], k1 = k[kParts - 1][e];
            q[0][e] = q0 * co - q1 * si, q[kParts - 1][e] = q0 * si + q1 * co;
            k[0][e] = k0 * co - k1 * si, k[kParts - 1][e] = k0 * si + k1 * co;
          }
        }
      }
    }
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      *reinterpret_cast<uint4*>(Qs + row * pitch + part * half + c * 8) = float8_to_bf16x8(q[part]);
      *reinterpret_cast<uint4*>(Ks + row * pitch + part * half + c * 8) = float8_to_bf16x8(k[part]);
    }
  }
  }
}

template <int N, int P>
__global__ void __launch_bounds__(kTcThreads) fwd_tc_kernel(CoreParams p) {
  using Lay = TcLayout<N, P>;
  extern __shared__ __align__(16) unsigned char smraw[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smraw + Lay::kQ);
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(smraw + Lay::kK);
  __nv_bfloat16* Vs = reinterpret_cast<__nv_bfloat16*>(smraw + Lay::kV);
  __nv_bfloat16* Vw = reinterpret_cast<__nv_bfloat16*>(smraw + Lay::kVw);
  __nv_bfloat16* Ss = reinterpret_cast<__nv_bfloat16*>(smraw + Lay::kSs);
  float* Sf = reinterpret_cast<float*>(smraw + Lay::kSf);
  float* Yf = reinterpret_cast<float*>(smraw + Lay::kY);
  float* thv = Yf;  // (C, NA) angles of the chunk's tokens, before Y is written
  float* cs = reinterpret_cast<float*>(smraw + Lay::kScal);
  float* ex = cs + kTcRows;
  float* gam = ex + kTcRows;
  float* w = gam + kTcRows;
  float* fw = w + kTcRows;
  float* rstd = fw + kTcRows;
  double* theta = reinterpret_cast<double*>(smraw + Lay::kTheta);
  float* psi_s = reinterpret_cast<float*>(smraw + Lay::kPar);  // (R, P) each; absent: 1
  float* zeta_s = psi_s + 8 * P;
  float* phi_s = zeta_s + 8 * P;
  float* wn_s = phi_s + 8 * P;

  const int R = p.R, NA = p.NA, C = kTcRows / R;
  const int s = blockIdx.x / p.H, h = blockIdx.x % p.H, g = h / p.hpg;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gq = lane >> 2, tq = lane & 3;
  int b = s, begin = 0, end = p.L;
  if (p.cu_seqlens) {
    b = 0;
    begin = p.cu_seqlens[s * p.cu_stride];
    end = p.cu_seqlens[(s + 1) * p.cu_stride];
  }
  const int n_tok = end - begin;
  const bool has_init = p.init_ssm.defined();
  const float dskip = p.d.defined() ? dload_ro(p.d, h * p.d.stride[0]) : 0.f;
  // Per-head parameters, once per CTA.
  load_head_params(p, h, psi_s, zeta_s, phi_s, wn_s, tid, kTcThreads);
  __syncthreads();
  auto psi_at = [&](int r, int x) { return psi_s[r * P + x]; };
  auto lam_at = [&](int l) {
    return sigmoidf_(dload_ro(p.trap, b * p.trap.stride[0] + h * p.trap.stride[1] + l * p.trap.stride[2]));
  };
  auto dt_at = [&](int l) {
    return dload_ro(p.dt, b * p.dt.stride[0] + h * p.dt.stride[1] + l * p.dt.stride[2]);
  };
  auto v_at = [&](int l, int x) {
    return dload_ro(p.v, b * p.v.stride[0] + l * p.v.stride[1] + h * p.v.stride[2] + x * p.v.stride[3]);
  };

  // Initial state S0 + (1 - lambda_0) dt_0 sum_r (v0 psi_r) k0_r^T, and angle theta0.
  if (tid < NA)
    theta[tid] = has_init ? dload_f64(p.init_angle, s * p.init_angle.stride[0] +
                                                        h * p.init_angle.stride[1] +
                                                        tid * p.init_angle.stride[2])
                          : 0.0;
  const float sg0 = n_tok > 0 && has_init ? (1.f - lam_at(begin)) * dt_at(begin) : 0.f;
  // State in registers (P = 64): warp w holds rows 16w..16w+15 in the C-fragment layout of the
  // state-update MMA, element (j, e) at x = 16w + gq + 8 (e >> 1), n = 8j + 2tq + (e & 1).
  float sreg[Lay::kStateInRegs ? N / 8 : 1][4];
  if constexpr (Lay::kStateInRegs) {
#pragma unroll
    for (int j = 0; j < N / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int x = warp * 16 + gq + (e >> 1) * 8, n = j * 8 + 2 * tq + (e & 1);
        sreg[j][e] = initial_state_elem(p, s, h, x, n, sg0, psi_s);
        Ss[x * Lay::kQp + n] = __float2bfloat16_rn(sreg[j][e]);
      }
  } else {
    for (int i = tid; i < P * N; i += kTcThreads) {
      const int x = i / N, n = i % N;
      const float v0 = initial_state_elem(p, s, h, x, n, sg0, psi_s);
      Sf[x * Lay::kSfp + n] = v0;
      Ss[x * Lay::kQp + n] = __float2bfloat16_rn(v0);
    }
  }
  __syncthreads();

  for (int c0 = 0; c0 < n_tok; c0 += C) {
    const int m = min(C, n_tok - c0), mr = m * R;
    if (tid < kTcRows) {
      float lam = 0.f, dl = 0.f, a = 0.f, sg = 0.f;
      if (tid < m) {
        const int l = begin + c0 + tid;
        lam = lam_at(l), dl = dt_at(l);
        a = dload(p.adt, b * p.adt.stride[0] + h * p.adt.stride[1] + l * p.adt.stride[2]);
        sg = (c0 + tid + 1 < n_tok) ? (1.f - lam_at(l + 1)) * dt_at(l + 1) : 0.f;
      }
      gam[tid] = lam * dl;
      w[tid] = lam * dl + sg;
      cs[tid] = a;
    }
    __syncthreads();
    if (tid == 0)
      for (int t = 1; t < m; ++t) cs[t] += cs[t - 1];
    // Angles: increments pi tanh(a) dt for every (token, angle) in parallel, a short float64
    // scan per angle over shared memory, then sin/cos in parallel.
    for (int i = tid; i < m * NA; i += kTcThreads) {
      const int t = i / NA, a = i % NA, l = begin + c0 + t;
      const float raw = dload_ro(p.angles, b * p.angles.stride[0] + l * p.angles.stride[1] +
                                               h * p.angles.stride[2] + a * p.angles.stride[3]);
      thv[i] = static_cast<float>(kPiD) * tanhf(raw) * dt_at(l);  // increment; angle below
    }
    __syncthreads();
    if (tid >= 32 && tid - 32 < NA) {  // warp 0's thread 0 scans cs meanwhile
      const int a = tid - 32;
      double th = theta[a];
      for (int t = 0; t < m; ++t) {
        th = wrap_2pi(th + static_cast<double>(thv[t * NA + a]));
        thv[t * NA + a] = static_cast<float>(th);
      }
      theta[a] = th;
    }
    __syncthreads();
    __syncthreads();  // the rotation below reads other threads' angles
    if (tid < kTcRows) {
      ex[tid] = tid < m ? expf(cs[tid]) : 0.f;
      fw[tid] = tid < m ? expf(cs[m - 1] - cs[tid]) * w[tid] : 0.f;
    }
    // Rotated biased q, k and v * psi rows (bf16); rows past the end are zero.
    if (p.tc_vec) {
      if (p.interleaved)
        load_qk_tiles_vec<N, true>(p, b, h, g, begin + c0, R, mr, thv, Qs, Ks, Lay::kQp, tid);
      else
        load_qk_tiles_vec<N, false>(p, b, h, g, begin + c0, R, mr, thv, Qs, Ks, Lay::kQp, tid);
    } else
#pragma unroll 4
    for (int i = tid; i < kTcRows * N; i += kTcThreads) {
      const int row = i / N, n = i % N, t = row / R, r = row % R;
      float qv = 0.f, kv = 0.f;
      if (row < mr) {
        const int l = begin + c0 + t;
        auto qx = [&](int j) {
          return dload_ro(p.q, qk_off(p.q, b, l, r, g, j)) +
                 dload_ro(p.q_bias, bias_off(p.q_bias, h, r, j));
        };
        auto kx = [&](int j) {
          return dload_ro(p.k, qk_off(p.k, b, l, r, g, j)) +
                 dload_ro(p.k_bias, bias_off(p.k_bias, h, r, j));
        };
        qv = rope_element_theta(p.interleaved, N, NA, n, thv + t * NA, qx);
        kv = rope_element_theta(p.interleaved, N, NA, n, thv + t * NA, kx);
      }
      Qs[row * Lay::kQp + n] = __float2bfloat16_rn(qv);
      Ks[row * Lay::kQp + n] = __float2bfloat16_rn(kv);
    }
    __syncthreads();  // fw ready; cos/sin no longer needed (Y may overwrite them)
    if (p.tc_vec) {
      // One 16-byte load of v per (token, 8 columns), written to the token's R rows.
      constexpr int kVc = P / 8;
      constexpr int kIt = kTcRows * kVc / kTcThreads;  // upper bound (C <= 64 tokens)
      uint4 va[kIt];
#pragma unroll
      for (int u = 0; u < kIt; ++u) {
        const int it = u * kTcThreads + tid, t = it / kVc, c = it % kVc;
        if (t < m)
          va[u] = ldg16(static_cast<const __nv_bfloat16*>(p.v.data) + b * p.v.stride[0] +
                        (begin + c0 + t) * p.v.stride[1] + h * p.v.stride[2] + c * 8);
      }
#pragma unroll
      for (int u = 0; u < kIt; ++u) {
        const int it = u * kTcThreads + tid, t = it / kVc, c = it % kVc;
        if (t >= C) continue;
        float vf[8];
        if (t < m)
          bf16x8_to_float(va[u], vf);
        else
#pragma unroll
          for (int e = 0; e < 8; ++e) vf[e] = 0.f;
        for (int r = 0; r < R; ++r) {
          float vp[8], vw[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            vp[e] = vf[e] * psi_s[r * P + c * 8 + e];
            vw[e] = t < m ? fw[t] * vp[e] : 0.f;
          }
          *reinterpret_cast<uint4*>(Vs + (t * R + r) * Lay::kVp + c * 8) = float8_to_bf16x8(vp);
          *reinterpret_cast<uint4*>(Vw + (t * R + r) * Lay::kVp + c * 8) = float8_to_bf16x8(vw);
        }
      }
    } else
#pragma unroll 4
    for (int i = tid; i < kTcRows * P; i += kTcThreads) {
      const int row = i / P, x = i % P, t = row / R, r = row % R;
      const float vv = row < mr ? v_at(begin + c0 + t, x) * psi_at(r, x) : 0.f;
      Vs[row * Lay::kVp + x] = __float2bfloat16_rn(vv);
      Vw[row * Lay::kVp + x] = __float2bfloat16_rn(row < mr ? fw[t] * vv : 0.f);
    }
    __syncthreads();

    // ---- Y for this warp's 16 rows.
    const int r0 = warp * 16;
    float sc[kTcRows / 8][4];
#pragma unroll
    for (int j = 0; j < kTcRows / 8; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
    for (int k0 = 0; k0 < N; k0 += 16) {
      uint32_t a[4];
      load_a(a, Qs, Lay::kQp, r0, k0, lane);
#pragma unroll
      for (int n0 = 0; n0 < kTcRows; n0 += 16) {
        uint32_t bb[4];
        load_b_nk(bb, Ks, Lay::kQp, n0, k0, lane);
        mma_bf16(sc[n0 / 8], a, bb[0], bb[1]);
        mma_bf16(sc[n0 / 8 + 1], a, bb[2], bb[3]);
      }
    }
    // Mask: M[i, j] = exp(cs_i - cs_j) w_j (j < i), gamma_i (j == i), 0 (j > i), by token.
#pragma unroll
    for (int j = 0; j < kTcRows / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = r0 + gq + (e >> 1) * 8, col = j * 8 + 2 * tq + (e & 1);
        const int ti = row / R, tj = col / R;
        float coef = 0.f;
        if (row < mr && col < mr) {
          if (tj < ti)
            coef = __expf(cs[ti] - cs[tj]) * w[tj];
          else if (tj == ti)
            coef = gam[ti];
        }
        sc[j][e] *= coef;
      }
    // Y = diag(exp(cs)) Q S^T, then += A V with A from the score fragments (one accumulator).
    float ya[P / 8][4];
#pragma unroll
    for (int j = 0; j < P / 8; ++j) ya[j][0] = ya[j][1] = ya[j][2] = ya[j][3] = 0.f;
#pragma unroll
    for (int k0 = 0; k0 < N; k0 += 16) {
      uint32_t a[4];
      load_a(a, Qs, Lay::kQp, r0, k0, lane);
#pragma unroll
      for (int n0 = 0; n0 < P; n0 += 16) {
        uint32_t bb[4];
        load_b_nk(bb, Ss, Lay::kQp, n0, k0, lane);  // B[k = n][col = x] = S[x][n]
        mma_bf16(ya[n0 / 8], a, bb[0], bb[1]);
        mma_bf16(ya[n0 / 8 + 1], a, bb[2], bb[3]);
      }
    }
    {
      const int ra = r0 + gq, rb = ra + 8;
      const float ea = ra < mr ? ex[ra / R] : 0.f, eb = rb < mr ? ex[rb / R] : 0.f;
#pragma unroll
      for (int j = 0; j < P / 8; ++j) {
        ya[j][0] *= ea, ya[j][1] *= ea, ya[j][2] *= eb, ya[j][3] *= eb;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kTcRows / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack_bf16(sc[2 * kk][0], sc[2 * kk][1]);
      a[1] = pack_bf16(sc[2 * kk][2], sc[2 * kk][3]);
      a[2] = pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      a[3] = pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
      for (int n0 = 0; n0 < P; n0 += 16) {
        uint32_t bb[4];
        load_b_kn(bb, Vs, Lay::kVp, n0, kk * 16, lane);
        mma_bf16(ya[n0 / 8], a, bb[0], bb[1]);
        mma_bf16(ya[n0 / 8 + 1], a, bb[2], bb[3]);
      }
    }
    // + D v psi in fp32 from the raw v (independent loads, issued together).
#pragma unroll
    for (int j = 0; j < P / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = r0 + gq + (e >> 1) * 8, col = j * 8 + 2 * tq + (e & 1);
        float dv = 0.f;
        if (p.d.defined() && row < mr)
          dv = dskip * v_at(begin + c0 + row / R, col) * psi_s[(row % R) * P + col];
        Yf[row * Lay::kYp + col] = ya[j][e] + dv;
      }
    __syncthreads();  // every warp has read Ss; Y complete

    // ---- State: S = exp(cs_last) S + (fw V)^T K; warp w owns rows x of S in 16-row tiles.
    const float el = ex[m - 1];
#pragma unroll
    for (int xm = 0; xm < P / 64; ++xm) {
      const int x0 = (xm * 4 + warp) * 16;
      float acc[N / 8][4];
#pragma unroll
      for (int j = 0; j < N / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
      for (int k0 = 0; k0 < kTcRows; k0 += 16) {
        uint32_t a[4];
        load_a_trans(a, Vw, Lay::kVp, x0, k0, lane);
#pragma unroll
        for (int n0 = 0; n0 < N; n0 += 16) {
          uint32_t bb[4];
          load_b_kn(bb, Ks, Lay::kQp, n0, k0, lane);
          mma_bf16(acc[n0 / 8], a, bb[0], bb[1]);
          mma_bf16(acc[n0 / 8 + 1], a, bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int j = 0; j < N / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int x = x0 + gq + (e >> 1) * 8, n = j * 8 + 2 * tq + (e & 1);
          float sv;
          if constexpr (Lay::kStateInRegs) {
            sv = el * sreg[j][e] + acc[j][e];
            sreg[j][e] = sv;
          } else {
            sv = el * Sf[x * Lay::kSfp + n] + acc[j][e];
            Sf[x * Lay::kSfp + n] = sv;
          }
          Ss[x * Lay::kQp + n] = __float2bfloat16_rn(sv);
        }
    }

    // ---- Output stage from Y (D v already in): per-row RMSNorm, gate, rank reduction.
    if (p.norm_weight.defined()) {
      for (int row = warp; row < mr; row += kTcThreads / 32) {
        float ss = 0.f;
        for (int x = lane; x < P; x += 32) {
          const float y = Yf[row * Lay::kYp + x];
          ss += y * y;
        }
        ss = warp_sum(ss);
        if (lane == 0) rstd[row] = rsqrtf(ss / P + p.eps);
      }
    }
    __syncthreads();
    for (int i = tid; i < m * P; i += kTcThreads) {
      const int t = i / P, x = i % P;
      store_output(p, b, begin + c0 + t, h, x, &Yf[t * R * Lay::kYp + x], Lay::kYp, &rstd[t * R],
                   1, zeta_s, phi_s, wn_s);
    }
    __syncthreads();
  }

  // Final states: S (fp32 master), wrapped angle, rotated k and raw v of the last token.
  if constexpr (Lay::kStateInRegs) {
    // The state lives in registers: each thread writes its fragment; the rest as usual.
    if (p.fin_ssm.defined() && n_tok > 0) {
#pragma unroll
      for (int j = 0; j < N / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int x = warp * 16 + gq + (e >> 1) * 8, n = j * 8 + 2 * tq + (e & 1);
          dstore(p.fin_ssm, s * p.fin_ssm.stride[0] + h * p.fin_ssm.stride[1] +
                                x * p.fin_ssm.stride[2] + n * p.fin_ssm.stride[3],
                 sreg[j][e]);
        }
    }
    write_final_states(
        p, s, h, g, b, end, n_tok, theta, [&](int, int) { return 0.f; }, tid, kTcThreads,
        /*write_ssm=*/n_tok == 0);
  } else {
    write_final_states(
        p, s, h, g, b, end, n_tok, theta, [&](int x, int n) { return Sf[x * Lay::kSfp + n]; },
        tid, kTcThreads);
  }
}

}  // namespace mamba3::cuda
