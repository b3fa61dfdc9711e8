// Chunked float32 evaluation of DESIGN.md §2.5 on the CPU.
//
// One task = one (sequence, head). A task first gathers its tokens into contiguous float rows
// (time-major, rank-minor: row t*R + r), rotating q and k, then walks chunks of C tokens:
//   A  = (Q K^T) o M           M[i,j] = exp(cs_i - cs_j) w_j (j < i), gamma_i (j == i), 0 (j > i)
//   Y  = A V + diag(exp(cs)) Q S^T + D V
//   S' = exp(cs_last) S + (diag(exp(cs_last - cs) w) V)^T K
// with w_j = gamma_j + sgamma_j, gamma = lambda dt, sgamma_j = (1 - lambda_{j+1}) dt_{j+1}.
// The backward recomputes the forward once (saving chunk-start states, raw scores and dY) and
// then walks the chunks in reverse. Parameter and grouped (GQA) gradients are reduced after the
// parallel region in a fixed order, so results do not depend on the thread count.
// Products inside a task must not fan out to threads: Eigen's blocking (and so the summation
// order) depends on its thread count, and results must not depend on how many threads run.
#define EIGEN_DONT_PARALLELIZE
#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/epilogue.h"
#include "common/layout.h"
#include "core/step_view.h"
#include "cpu/cpu_lane.h"

namespace mamba3::cpu {
namespace {

using RMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapM = Eigen::Map<RMat>;
using CMapM = Eigen::Map<const RMat>;
using ArrF = Eigen::ArrayXf;
// Aligned storage: Eigen's vectorized reductions peel to the first aligned element, so the
// summation order of a Map depends on its address modulo the vector width. Aligned bases make
// it depend on shapes only, which keeps results bitwise reproducible.
using Vf = std::vector<float, Eigen::aligned_allocator<float>>;

// Reads `count` elements starting at element offset `off` with element stride `stride`.
void load_row(const Tensor& t, int64_t off, int64_t stride, int64_t count, float* dst) {
  if (t.dtype == DType::kF32 && stride == 1) {
    std::memcpy(dst, static_cast<const float*>(t.data) + off, sizeof(float) * count);
    return;
  }
  switch (t.dtype) {
    case DType::kF32: {
      const float* p = static_cast<const float*>(t.data) + off;
      for (int64_t i = 0; i < count; ++i) dst[i] = p[i * stride];
      break;
    }
    case DType::kBF16: {
      const uint16_t* p = static_cast<const uint16_t*>(t.data) + off;
      for (int64_t i = 0; i < count; ++i) dst[i] = bf16_to_float(p[i * stride]);
      break;
    }
    default:
      for (int64_t i = 0; i < count; ++i)
        dst[i] = static_cast<float>(load_as_double(t.data, t.dtype, off + i * stride));
  }
}

void store_row(const Tensor& t, int64_t off, int64_t stride, int64_t count, const float* src) {
  if (t.dtype == DType::kF32 && stride == 1) {
    std::memcpy(static_cast<float*>(t.data) + off, src, sizeof(float) * count);
    return;
  }
  if (t.dtype == DType::kBF16) {
    uint16_t* p = static_cast<uint16_t*>(t.data) + off;
    for (int64_t i = 0; i < count; ++i) p[i * stride] = float_to_bf16(src[i]);
    return;
  }
  for (int64_t i = 0; i < count; ++i) store_from_double(t.data, t.dtype, off + i * stride, src[i]);
}

// Per-head parameters shared by every sequence.
struct HeadParams {
  Vf psi, zeta, phi, w;  // (R, P), (R, P), (R, P), (P); empty when absent
  float dskip = 0.f;
  Vf qb, kb;             // (R, N)
};

HeadParams load_params(const Inputs& in, const Dims& d, int64_t h) {
  HeadParams hp;
  const int64_t R = d.R, P = d.P, N = d.N;
  auto rp = [&](const Tensor& t, Vf* dst) {
    if (!t.defined()) return;
    dst->resize(R * P);
    for (int64_t r = 0; r < R; ++r)
      load_row(t, h * t.strides[0] + r * t.strides[1], t.strides[2], P, &(*dst)[r * P]);
  };
  rp(in.mimo_v, &hp.psi);
  rp(in.mimo_z, &hp.zeta);
  rp(in.mimo_o, &hp.phi);
  if (in.norm_weight.defined()) {
    hp.w.resize(P);
    load_row(in.norm_weight, h * in.norm_weight.strides[0], in.norm_weight.strides[1], P,
             hp.w.data());
  }
  hp.dskip = in.d.defined() ? static_cast<float>(tget(in.d, h)) : 0.f;
  hp.qb.resize(R * N);
  hp.kb.resize(R * N);
  const int64_t bs = in.q_bias.strides[in.q_bias.ndim - 1], ks = in.k_bias.strides[in.k_bias.ndim - 1];
  for (int64_t r = 0; r < R; ++r) {
    load_row(in.q_bias, bias_offset(in.q_bias, h, r, 0), bs, N, &hp.qb[r * N]);
    load_row(in.k_bias, bias_offset(in.k_bias, h, r, 0), ks, N, &hp.kb[r * N]);
  }
  return hp;
}

// One (sequence, head), gathered.
struct Task {
  const Dims* d = nullptr;
  const HeadParams* hp = nullptr;
  int64_t s = 0, h = 0, g = 0, batch = 0, begin = 0, n = 0, C = 64;
  RopePairing pairing = RopePairing::kInterleaved;
  Vf qh, kh;          // (n*R, N) rotated
  Vf v, vr;           // (n, P) raw; (n*R, P) v * psi_r
  Vf z;               // (n, P) or empty
  Vf lam, dlt, cs, gam, w;   // (n); cs = inclusive cumsum of adt inside each chunk
  Vf cosv, sinv;      // (n, NA)
  Vf tanh_ang;        // (n, NA), kept for the backward
  std::vector<double> theta_last;  // (NA) unwrapped final angle
  Vf s0, k0, v0, th0;  // (P, N), (R, N), (P), (NA); zero without initial states
  float sg_init = 0.f; // (1 - lambda_0) dt_0: weight of the initial (k0, v0) pair

  float psi_at(int64_t r, int64_t p) const { return hp->psi.empty() ? 1.f : hp->psi[r * d->P + p]; }
  int64_t chunks() const { return (n + C - 1) / C; }
};

// Copies the entries of an N-vector that no rope pair touches.
void copy_unrotated(const Task& tk, const float* x, float* out) {
  const int64_t N = tk.d->N, NA = tk.d->NA;
  if (tk.pairing == RopePairing::kInterleaved) {
    for (int64_t i = 2 * NA; i < N; ++i) out[i] = x[i];
  } else {
    const int64_t half = N / 2;
    for (int64_t i = NA; i < half; ++i) out[i] = x[i];
    for (int64_t i = half + NA; i < N; ++i) out[i] = x[i];
  }
}

void rotate_rows(const Task& tk, const float* cosv, const float* sinv, const float* x, float* out) {
  const int64_t N = tk.d->N, NA = tk.d->NA;
  copy_unrotated(tk, x, out);
  if (tk.pairing == RopePairing::kInterleaved) {
    for (int64_t i = 0; i < NA; ++i) {
      const float a = x[2 * i], b = x[2 * i + 1];
      out[2 * i] = a * cosv[i] - b * sinv[i];
      out[2 * i + 1] = a * sinv[i] + b * cosv[i];
    }
  } else {
    const int64_t half = N / 2;
    for (int64_t i = 0; i < NA; ++i) {
      const float a = x[i], b = x[i + half];
      out[i] = a * cosv[i] - b * sinv[i];
      out[i + half] = a * sinv[i] + b * cosv[i];
    }
  }
}

void gather(const Inputs& in, const Dims& d, const HeadParams& hp, int64_t s, int64_t h,
            bool for_backward, Task* tk) {
  const SeqRange range = seq_range(in, d, s);
  const int64_t R = d.R, N = d.N, P = d.P, NA = d.NA;
  tk->d = &d;
  tk->hp = &hp;
  tk->s = s, tk->h = h, tk->g = h / d.heads_per_group();
  tk->batch = range.batch, tk->begin = range.begin, tk->n = range.end - range.begin;
  tk->C = std::max<int64_t>(1, in.chunk_size);
  tk->pairing = in.rope_pairing;
  const int64_t n = tk->n, b = tk->batch, g = tk->g, l0 = tk->begin;

  // Scalars per token.
  tk->lam.resize(n), tk->dlt.resize(n), tk->cs.resize(n), tk->gam.resize(n), tk->w.resize(n);
  Vf adt(n), trap(n);
  if (n > 0) {
    load_row(in.adt, b * in.adt.strides[0] + h * in.adt.strides[1] + l0 * in.adt.strides[2],
             in.adt.strides[2], n, adt.data());
    load_row(in.dt, b * in.dt.strides[0] + h * in.dt.strides[1] + l0 * in.dt.strides[2],
             in.dt.strides[2], n, tk->dlt.data());
    load_row(in.trap, b * in.trap.strides[0] + h * in.trap.strides[1] + l0 * in.trap.strides[2],
             in.trap.strides[2], n, trap.data());
  }
  for (int64_t t = 0; t < n; ++t) {
    tk->lam[t] = 1.f / (1.f + std::exp(-trap[t]));
    tk->gam[t] = tk->lam[t] * tk->dlt[t];
  }
  for (int64_t t = 0; t < n; ++t) {
    const float sg = t + 1 < n ? (1.f - tk->lam[t + 1]) * tk->dlt[t + 1] : 0.f;
    tk->w[t] = tk->gam[t] + sg;
    tk->cs[t] = (t % tk->C == 0 ? 0.f : tk->cs[t - 1]) + adt[t];
  }
  tk->sg_init = n > 0 ? (1.f - tk->lam[0]) * tk->dlt[0] : 0.f;

  // Angles: increments in float, running sum in double, wrapped before sin/cos.
  tk->cosv.resize(n * NA), tk->sinv.resize(n * NA);
  tk->th0.assign(NA, 0.f);
  if (in.initial.all())
    for (int64_t i = 0; i < NA; ++i) tk->th0[i] = static_cast<float>(tget(in.initial.angle, s, h, i));
  tk->theta_last.assign(tk->th0.begin(), tk->th0.end());
  if (NA > 0 && n > 0) {
    Vf raw(n * NA);
    for (int64_t t = 0; t < n; ++t)
      load_row(in.angles,
               b * in.angles.strides[0] + (l0 + t) * in.angles.strides[1] + h * in.angles.strides[2],
               in.angles.strides[3], NA, &raw[t * NA]);
    Eigen::Map<ArrF> ra(raw.data(), n * NA);
    ra = ra.tanh();
    if (for_backward) tk->tanh_ang = raw;
    std::vector<double>& th = tk->theta_last;
    const double two_pi = 2.0 * kPi;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < NA; ++i) {
        th[i] += static_cast<double>(static_cast<float>(kPi) * raw[t * NA + i] * tk->dlt[t]);
        raw[t * NA + i] = static_cast<float>(th[i] - two_pi * std::floor(th[i] / two_pi));
      }
    Eigen::Map<ArrF> ca(tk->cosv.data(), n * NA), sa(tk->sinv.data(), n * NA);
    ca = ra.cos();
    sa = ra.sin();
  }

  // q, k (biased, rotated), v, v * psi, z.
  tk->qh.resize(n * R * N), tk->kh.resize(n * R * N);
  Vf qrow(N), krow(N);
  const int64_t qs = in.q.strides[in.q.ndim - 1], ks = in.k.strides[in.k.ndim - 1];
  for (int64_t t = 0; t < n; ++t)
    for (int64_t r = 0; r < R; ++r) {
      load_row(in.q, qk_offset(in.q, b, l0 + t, r, g, 0), qs, N, qrow.data());
      load_row(in.k, qk_offset(in.k, b, l0 + t, r, g, 0), ks, N, krow.data());
      for (int64_t i = 0; i < N; ++i) {
        qrow[i] += hp.qb[r * N + i];
        krow[i] += hp.kb[r * N + i];
      }
      const int64_t row = (t * R + r) * N;
      rotate_rows(*tk, &tk->cosv[t * NA], &tk->sinv[t * NA], qrow.data(), &tk->qh[row]);
      rotate_rows(*tk, &tk->cosv[t * NA], &tk->sinv[t * NA], krow.data(), &tk->kh[row]);
    }
  tk->v.resize(n * P), tk->vr.resize(n * R * P);
  const int64_t vs = in.v.strides[3];
  for (int64_t t = 0; t < n; ++t) {
    load_row(in.v, b * in.v.strides[0] + (l0 + t) * in.v.strides[1] + h * in.v.strides[2], vs, P,
             &tk->v[t * P]);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t p = 0; p < P; ++p) tk->vr[(t * R + r) * P + p] = tk->v[t * P + p] * tk->psi_at(r, p);
  }
  tk->z.clear();
  if (in.z.defined()) {
    tk->z.resize(n * P);
    for (int64_t t = 0; t < n; ++t)
      load_row(in.z, b * in.z.strides[0] + (l0 + t) * in.z.strides[1] + h * in.z.strides[2],
               in.z.strides[3], P, &tk->z[t * P]);
  }

  // Initial states.
  tk->s0.assign(P * N, 0.f), tk->k0.assign(R * N, 0.f), tk->v0.assign(P, 0.f);
  if (in.initial.all()) {
    const States& st = in.initial;
    for (int64_t p = 0; p < P; ++p)
      load_row(st.ssm, s * st.ssm.strides[0] + h * st.ssm.strides[1] + p * st.ssm.strides[2],
               st.ssm.strides[3], N, &tk->s0[p * N]);
    for (int64_t r = 0; r < R; ++r)
      load_row(st.k, state_k_offset(st.k, s, r, h, 0), st.k.strides[st.k.ndim - 1], N,
               &tk->k0[r * N]);
    load_row(st.v, s * st.v.strides[0] + h * st.v.strides[1], st.v.strides[2], P, tk->v0.data());
  }
}

// Time-level mask of one chunk: M[i,j] (m x m), and E[i,j] = exp(cs_i - cs_j) for j < i.
void chunk_mask(const Task& tk, int64_t t0, int64_t m, RMat* M, RMat* E) {
  M->setZero(m, m);
  E->setZero(m, m);
  ArrF diff(m);
  for (int64_t i = 0; i < m; ++i) {
    const float ci = tk.cs[t0 + i];
    for (int64_t j = 0; j < i; ++j) diff[j] = ci - tk.cs[t0 + j];
    diff.head(i) = diff.head(i).exp();
    for (int64_t j = 0; j < i; ++j) {
      (*E)(i, j) = diff[j];
      (*M)(i, j) = diff[j] * tk.w[t0 + j];
    }
    (*M)(i, i) = tk.gam[t0 + i];
  }
}

// Multiplies a (m*R x m*R) row-level matrix by the time-level mask.
void apply_mask(const RMat& M, int64_t R, RMat* X) {
  const int64_t m = M.rows();
  if (R == 1) {
    X->array() *= M.array();
    return;
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = 0; j < m; ++j) {
        const float c = M(i, j);
        for (int64_t r2 = 0; r2 < R; ++r2) (*X)(i * R + r, j * R + r2) *= c;
      }
}

EpilogueParams<float> make_epilogue(const Task& tk, float eps) {
  EpilogueParams<float> e;
  e.R = tk.d->R;
  e.P = tk.d->P;
  e.reduce = !tk.d->per_rank_out;
  e.zeta = tk.hp->zeta.empty() ? nullptr : tk.hp->zeta.data();
  e.phi = tk.hp->phi.empty() ? nullptr : tk.hp->phi.data();
  e.norm_w = tk.hp->w.empty() ? nullptr : tk.hp->w.data();
  e.eps = eps;
  return e;
}

// The state before chunk 0: S0 + (1 - lambda_0) dt_0 sum_r (v0 * psi_r) k0_r^T.
void initial_state(const Task& tk, RMat* S) {
  const int64_t R = tk.d->R, P = tk.d->P, N = tk.d->N;
  *S = CMapM(tk.s0.data(), P, N);
  if (tk.sg_init == 0.f) return;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t p = 0; p < P; ++p) {
      const float x = tk.sg_init * tk.v0[p] * tk.psi_at(r, p);
      for (int64_t i = 0; i < N; ++i) (*S)(p, i) += x * tk.k0[r * N + i];
    }
}

// Forward over every chunk. Y (n*R x P) receives y_{t,r} before the epilogue. Optional saves
// for the backward: chunk-start states (chunks, P, N) and raw scores of each chunk.
struct ForwardSaves {
  float* s_prev = nullptr;  // (chunks, P, N) or null
  float* scores = nullptr;  // (chunks, C*R, C*R) or null
  int64_t score_stride = 0;
};

// Per-thread buffers reused across tasks and calls (OpenMP keeps its threads), so large
// arrays are not re-allocated and re-faulted for every (sequence, head).
struct Scratch {
  Vf y, dy, dz, dqh, dkh, dvr, s_prev, scores;
};
thread_local Task tls_task;
thread_local Scratch tls_scratch;

void forward_chunks(const Task& tk, RMat* S, float* y_out, ForwardSaves* saves) {
  const int64_t R = tk.d->R, N = tk.d->N, P = tk.d->P;
  RMat M, E, A, QS;

  for (int64_t c = 0; c < tk.chunks(); ++c) {
    const int64_t t0 = c * tk.C, m = std::min(tk.C, tk.n - t0), mr = m * R;
    CMapM Q(&tk.qh[t0 * R * N], mr, N), K(&tk.kh[t0 * R * N], mr, N);
    CMapM V(&tk.vr[t0 * R * P], mr, P);
    MapM Y(y_out + t0 * R * P, mr, P);
    chunk_mask(tk, t0, m, &M, &E);
    A.noalias() = Q * K.transpose();
    if (saves && saves->s_prev) MapM(saves->s_prev + c * P * N, P, N) = *S;
    if (saves && saves->scores) MapM(saves->scores + c * saves->score_stride, mr, mr) = A;
    apply_mask(M, R, &A);
    Y.noalias() = A * V;
    QS.noalias() = Q * S->transpose();
    for (int64_t i = 0; i < m; ++i) {
      const float e = std::exp(tk.cs[t0 + i]);
      for (int64_t r = 0; r < R; ++r) Y.row(i * R + r) += e * QS.row(i * R + r);
    }
    if (tk.hp->dskip != 0.f) Y += tk.hp->dskip * V;
    // S' = exp(cs_last) S + (f w V)^T K, f_j = exp(cs_last - cs_j).
    const float cl = tk.cs[t0 + m - 1];
    RMat Vs(mr, P);
    for (int64_t j = 0; j < m; ++j) {
      const float fw = std::exp(cl - tk.cs[t0 + j]) * tk.w[t0 + j];
      for (int64_t r = 0; r < R; ++r) Vs.row(j * R + r) = fw * V.row(j * R + r);
    }
    *S *= std::exp(cl);
    S->noalias() += Vs.transpose() * K;
  }
}

int resolve_threads(int requested) {
  return requested > 0 ? requested : omp_get_max_threads();
}

void write_final_states(const Task& tk, const RMat& S, const States& f) {
  if (!f.all()) return;
  const int64_t R = tk.d->R, N = tk.d->N, P = tk.d->P, NA = tk.d->NA, s = tk.s, h = tk.h;
  for (int64_t i = 0; i < NA; ++i) tset(f.angle, wrap_angle(tk.theta_last[i]), s, h, i);
  for (int64_t p = 0; p < P; ++p)
    store_row(f.ssm, s * f.ssm.strides[0] + h * f.ssm.strides[1] + p * f.ssm.strides[2],
              f.ssm.strides[3], N, &S(p, 0));
  const float* klast = tk.n > 0 ? &tk.kh[(tk.n - 1) * R * N] : tk.k0.data();
  const float* vlast = tk.n > 0 ? &tk.v[(tk.n - 1) * P] : tk.v0.data();
  for (int64_t r = 0; r < R; ++r)
    store_row(f.k, state_k_offset(f.k, s, r, h, 0), f.k.strides[f.k.ndim - 1], N, &klast[r * N]);
  store_row(f.v, s * f.v.strides[0] + h * f.v.strides[1], f.v.strides[2], P, vlast);
}

// The final ssm state of an empty sequence is its initial state, untouched.
void final_ssm(const Task& tk, RMat* S) {
  if (tk.n == 0) *S = CMapM(tk.s0.data(), tk.d->P, tk.d->N);
}

constexpr int64_t kSavedHeader = 16;
constexpr int32_t kSavedMagic = 0x4d334356;  // "M3CV"

int64_t task_saved_floats(int64_t n, int64_t C, const Dims& d) {
  return (n + C - 1) / C * d.P * d.N + n * d.R * d.P;
}

// Offsets (in floats, after the header) of every (sequence, head) in ForwardArgs::saved.
std::vector<int64_t> saved_offsets(const Inputs& in, const Dims& d) {
  const int64_t C = std::max(1, in.chunk_size);
  std::vector<int64_t> off(d.S * d.H + 1, 0);
  for (int64_t s = 0; s < d.S; ++s) {
    const SeqRange r = seq_range(in, d, s);
    for (int64_t h = 0; h < d.H; ++h)
      off[s * d.H + h + 1] = off[s * d.H + h] + task_saved_floats(r.end - r.begin, C, d);
  }
  return off;
}

std::vector<int32_t> saved_header(const Inputs& in, const Dims& d) {
  return {kSavedMagic, 1,
          static_cast<int32_t>(d.B), static_cast<int32_t>(d.L), static_cast<int32_t>(d.H),
          static_cast<int32_t>(d.G), static_cast<int32_t>(d.N), static_cast<int32_t>(d.P),
          static_cast<int32_t>(d.R), static_cast<int32_t>(d.NA), static_cast<int32_t>(d.S),
          in.chunk_size, d.per_rank_out ? 1 : 0, 0, 0, 0};
}

}  // namespace

int64_t saved_numel(const Inputs& in, const Dims& d) {
  return kSavedHeader + saved_offsets(in, d).back();
}

Status forward(const ForwardArgs& a, const Dims& d) {
  const Inputs& in = a.in;
  const int64_t tasks = d.S * d.H;
  std::vector<HeadParams> params(d.H);
  for (int64_t h = 0; h < d.H; ++h) params[h] = load_params(in, d, h);
  const int64_t R = d.R, P = d.P, N = d.N;
  const int64_t out_cols = d.per_rank_out ? R * P : P;
  float* saved = a.saved.defined() ? static_cast<float*>(a.saved.data) : nullptr;
  std::vector<int64_t> offsets;
  if (saved) {
    offsets = saved_offsets(in, d);
    const std::vector<int32_t> hdr = saved_header(in, d);
    std::memcpy(saved, hdr.data(), sizeof(int32_t) * kSavedHeader);
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(resolve_threads(a.num_threads))
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t s = task / d.H, h = task % d.H;
    Task& tk = tls_task;
    gather(in, d, params[h], s, h, false, &tk);
    RMat S;
    initial_state(tk, &S);
    Vf& ybuf = tls_scratch.y;
    float* y = nullptr;
    ForwardSaves fs;
    if (saved) {
      fs.s_prev = saved + kSavedHeader + offsets[task];
      y = fs.s_prev + tk.chunks() * P * N;
    } else {
      ybuf.resize(tk.n * R * P);
      y = ybuf.data();
    }
    Vf out(out_cols);
    forward_chunks(tk, &S, y, saved ? &fs : nullptr);
    final_ssm(tk, &S);
    EpilogueParams<float> epi = make_epilogue(tk, in.norm_eps);
    for (int64_t t = 0; t < tk.n; ++t) {
      epi.z = tk.z.empty() ? nullptr : &tk.z[t * P];
      epilogue_forward(epi, &y[t * R * P], out.data());
      const int64_t l = tk.begin + t;
      const Tensor& o = a.out;
      if (d.per_rank_out) {
        for (int64_t r = 0; r < R; ++r)
          store_row(o, tk.batch * o.strides[0] + l * o.strides[1] + r * o.strides[2] + h * o.strides[3],
                    o.strides[4], P, &out[r * P]);
      } else {
        store_row(o, tk.batch * o.strides[0] + l * o.strides[1] + h * o.strides[2], o.strides[3], P,
                  out.data());
      }
    }
    write_final_states(tk, S, a.final_states);
  }
  return Status::Ok();
}

namespace {

// Gradients one task produces that must be reduced across tasks in a fixed order afterwards.
struct TaskGrads {
  Vf dq, dk;                          // (n*R, N) w.r.t. the biased, unrotated q and k
  Vf dqb, dkb;                        // (R, N)
  Vf dpsi, dzeta, dphi, dw;           // (R, P), (R, P), (R, P), (P)
  float dskip = 0.f;
};

// Adjoint of rotate_rows: dx = Rot^T dout; dtheta_i += -dout_a b' + dout_b a'.
void rotate_rows_backward(const Task& tk, const float* cosv, const float* sinv,
                          const float* rotated, const float* dout, float* dx, float* dtheta) {
  const int64_t N = tk.d->N, NA = tk.d->NA;
  copy_unrotated(tk, dout, dx);
  const int64_t off_b = tk.pairing == RopePairing::kInterleaved ? 1 : N / 2;
  const int64_t step = tk.pairing == RopePairing::kInterleaved ? 2 : 1;
  for (int64_t i = 0; i < NA; ++i) {
    const int64_t a = i * step, b = a + off_b;
    dx[a] = dout[a] * cosv[i] + dout[b] * sinv[i];
    dx[b] = -dout[a] * sinv[i] + dout[b] * cosv[i];
    dtheta[i] += -dout[a] * rotated[b] + dout[b] * rotated[a];
  }
}

// `saved`: this task's region of BackwardArgs::saved, or null to recompute the forward.
void backward_task(const BackwardArgs& a, const Task& tk, const float* saved, TaskGrads* tg) {
  const Dims& d = *tk.d;
  const Grads& gr = a.grads;
  const States& df = a.d_final;
  const int64_t R = d.R, N = d.N, P = d.P, NA = d.NA, n = tk.n, s = tk.s, h = tk.h, b = tk.batch;
  const int64_t out_cols = d.per_rank_out ? R * P : P;
  const HeadParams& hp = *tk.hp;

  // Pass 1: the forward (or the saved chunk-start states and pre-gate y), then the epilogue's
  // adjoint gives dY.
  Scratch& sc = tls_scratch;
  Vf &dy = sc.dy, &dz = sc.dz, &dqh = sc.dqh, &dkh = sc.dkh, &dvr = sc.dvr;
  dy.resize(n * R * P), dz.assign(tk.z.empty() ? 0 : n * P, 0.f);
  Vf dout(out_cols);
  ForwardSaves saves;
  const float* y = nullptr;
  if (saved) {
    saves.s_prev = const_cast<float*>(saved);
    y = saved + tk.chunks() * P * N;
  } else {
    RMat S;
    initial_state(tk, &S);
    sc.y.resize(n * R * P);
    sc.s_prev.resize(tk.chunks() * P * N);
    saves.score_stride = tk.C * R * tk.C * R;
    sc.scores.resize(tk.chunks() * saves.score_stride);
    saves.s_prev = sc.s_prev.data();
    saves.scores = sc.scores.data();
    forward_chunks(tk, &S, sc.y.data(), &saves);
    y = sc.y.data();
  }
  tg->dzeta.assign(R * P, 0.f), tg->dphi.assign(R * P, 0.f), tg->dw.assign(P, 0.f);
  EpilogueParams<float> epi = make_epilogue(tk, a.in.norm_eps);
  const Tensor& go = a.d_out;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t l = tk.begin + t;
    if (d.per_rank_out) {
      for (int64_t r = 0; r < R; ++r)
        load_row(go, b * go.strides[0] + l * go.strides[1] + r * go.strides[2] + h * go.strides[3],
                 go.strides[4], P, &dout[r * P]);
    } else {
      load_row(go, b * go.strides[0] + l * go.strides[1] + h * go.strides[2], go.strides[3], P,
               dout.data());
    }
    epi.z = tk.z.empty() ? nullptr : &tk.z[t * P];
    epilogue_backward(epi, &y[t * R * P], dout.data(), &dy[t * R * P],
                      tk.z.empty() ? nullptr : &dz[t * P], tg->dzeta.data(), tg->dphi.data(),
                      tg->dw.data());
  }

  // Pass 2: chunks in reverse.
  RMat dS = RMat::Zero(P, N);
  if (df.ssm.defined())
    for (int64_t p = 0; p < P; ++p)
      load_row(df.ssm, s * df.ssm.strides[0] + h * df.ssm.strides[1] + p * df.ssm.strides[2],
               df.ssm.strides[3], N, &dS(p, 0));
  dqh.resize(n * R * N), dkh.resize(n * R * N), dvr.resize(n * R * P);
  Vf dcs(n, 0.f), dwt(n, 0.f), dgam(n, 0.f);
  float dskip = 0.f;
  RMat M, E, Am, dA, T1, KdS, VdS, eY, raw_buf;
  for (int64_t c = tk.chunks() - 1; c >= 0; --c) {
    const int64_t t0 = c * tk.C, m = std::min(tk.C, n - t0), mr = m * R;
    CMapM Q(&tk.qh[t0 * R * N], mr, N), K(&tk.kh[t0 * R * N], mr, N);
    CMapM V(&tk.vr[t0 * R * P], mr, P), dY(&dy[t0 * R * P], mr, P);
    if (!saves.scores) raw_buf.noalias() = Q * K.transpose();
    CMapM raw(saves.scores ? saves.scores + c * saves.score_stride : raw_buf.data(), mr, mr);
    CMapM Sp(saves.s_prev + c * P * N, P, N);
    chunk_mask(tk, t0, m, &M, &E);
    Am = raw;
    apply_mask(M, R, &Am);
    dA.noalias() = dY * V.transpose();
    // Time-level sums over ranks: gradients of the mask entries.
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j <= i; ++j) {
        float sraw = 0.f;
        for (int64_t r = 0; r < R; ++r)
          for (int64_t r2 = 0; r2 < R; ++r2) sraw += dA(i * R + r, j * R + r2) * raw(i * R + r, j * R + r2);
        if (j == i) {
          dgam[t0 + i] += sraw;
        } else {
          dwt[t0 + j] += sraw * E(i, j);
          const float gl = sraw * M(i, j);
          dcs[t0 + i] += gl;
          dcs[t0 + j] -= gl;
        }
      }
    apply_mask(M, R, &dA);
    MapM dQ(&dqh[t0 * R * N], mr, N), dK(&dkh[t0 * R * N], mr, N), dV(&dvr[t0 * R * P], mr, P);
    dQ.noalias() = dA * K;
    dK.noalias() = dA.transpose() * Q;
    dV.noalias() = Am.transpose() * dY;
    // Inter-chunk term y_i += exp(cs_i) S_prev q_i.
    T1.noalias() = dY * Sp;
    for (int64_t i = 0; i < m; ++i) {
      const float e = std::exp(tk.cs[t0 + i]);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t row = i * R + r;
        dcs[t0 + i] += e * T1.row(row).dot(Q.row(row));
        dQ.row(row) += e * T1.row(row);
      }
    }
    // State term S' = exp(cs_last) S_prev + sum_j f_j w_j v_j k_j^T.
    const float cl = tk.cs[t0 + m - 1], el = std::exp(cl);
    KdS.noalias() = K * dS.transpose();
    VdS.noalias() = V * dS;
    for (int64_t j = 0; j < m; ++j) {
      const float f = std::exp(cl - tk.cs[t0 + j]), fw = f * tk.w[t0 + j];
      float x = 0.f;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t row = j * R + r;
        x += V.row(row).dot(KdS.row(row));
        dV.row(row) += fw * KdS.row(row);
        dK.row(row) += fw * VdS.row(row);
      }
      dwt[t0 + j] += f * x;
      dcs[t0 + j] -= fw * x;
      dcs[t0 + m - 1] += fw * x;
    }
    dcs[t0 + m - 1] += el * (dS.array() * Sp.array()).sum();
    // Skip term y += D v.
    if (hp.dskip != 0.f || gr.d.defined()) {
      dskip += (dY.array() * V.array()).sum();
      dV += hp.dskip * dY;
    }
    // dS_prev = exp(cs_last) dS + (diag(exp(cs)) dY)^T Q.
    eY = dY;
    for (int64_t i = 0; i < m; ++i) {
      const float e = std::exp(tk.cs[t0 + i]);
      for (int64_t r = 0; r < R; ++r) eY.row(i * R + r) *= e;
    }
    dS *= el;
    dS.noalias() += eY.transpose() * Q;
  }
  tg->dskip = dskip;

  // Final-state cotangents of k (rotated) and v (raw) land on the last token.
  Vf dk0(R * N, 0.f), dv0(P, 0.f), dvraw(n * P, 0.f);
  if (df.k.defined())
    for (int64_t r = 0; r < R; ++r) {
      Vf tmp(N);
      load_row(df.k, state_k_offset(df.k, s, r, h, 0), df.k.strides[df.k.ndim - 1], N, tmp.data());
      float* dst = n > 0 ? &dkh[((n - 1) * R + r) * N] : &dk0[r * N];
      for (int64_t i = 0; i < N; ++i) dst[i] += tmp[i];
    }
  if (df.v.defined()) {
    Vf tmp(P);
    load_row(df.v, s * df.v.strides[0] + h * df.v.strides[1], df.v.strides[2], P, tmp.data());
    float* dst = n > 0 ? &dvraw[(n - 1) * P] : dv0.data();
    for (int64_t p = 0; p < P; ++p) dst[p] += tmp[p];
  }

  // The initial pair enters as S_eff = S0 + sg_init sum_r (v0 psi_r) k0_r^T.
  tg->dpsi.assign(R * P, 0.f);
  float dsg_init = 0.f;
  if (n > 0 && a.in.initial.all()) {
    for (int64_t r = 0; r < R; ++r) {
      Eigen::VectorXf dSk = dS * Eigen::Map<const Eigen::VectorXf>(&tk.k0[r * N], N);
      Eigen::VectorXf xp(P);
      for (int64_t p = 0; p < P; ++p) xp[p] = tk.v0[p] * tk.psi_at(r, p);
      dsg_init += xp.dot(dSk);
      Eigen::VectorXf dSx = dS.transpose() * xp;
      for (int64_t i = 0; i < N; ++i) dk0[r * N + i] += tk.sg_init * dSx[i];
      for (int64_t p = 0; p < P; ++p) {
        const float dxp = tk.sg_init * dSk[p];
        dv0[p] += dxp * tk.psi_at(r, p);
        tg->dpsi[r * P + p] += dxp * tk.v0[p];
      }
    }
  }

  // Per-token scalars: adt from the chunk-local cumsum, lambda and dt from gamma and w.
  Vf dlam(n, 0.f), ddt(n, 0.f), dadt(n, 0.f);
  for (int64_t c = 0; c < tk.chunks(); ++c) {
    const int64_t t0 = c * tk.C, t1 = std::min(n, t0 + tk.C);
    float acc = 0.f;
    for (int64_t t = t1 - 1; t >= t0; --t) dadt[t] = (acc += dcs[t]);
  }
  for (int64_t t = 0; t < n; ++t) {
    const float dg = dgam[t] + dwt[t];
    dlam[t] += dg * tk.dlt[t];
    ddt[t] += dg * tk.lam[t];
    if (t + 1 < n) {
      dlam[t + 1] -= dwt[t] * tk.dlt[t + 1];
      ddt[t + 1] += dwt[t] * (1.f - tk.lam[t + 1]);
    }
  }
  if (n > 0) {
    dlam[0] -= dsg_init * tk.dlt[0];
    ddt[0] += dsg_init * (1.f - tk.lam[0]);
  }

  // v * psi -> raw v and psi.
  for (int64_t t = 0; t < n; ++t)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t p = 0; p < P; ++p) {
        const float g = dvr[(t * R + r) * P + p];
        dvraw[t * P + p] += g * tk.psi_at(r, p);
        tg->dpsi[r * P + p] += g * tk.v[t * P + p];
      }

  // Rotations, then the angle recurrence theta_t = theta_{t-1} + pi tanh(angles_t) dt_t.
  tg->dq.resize(n * R * N), tg->dk.resize(n * R * N);
  tg->dqb.assign(R * N, 0.f), tg->dkb.assign(R * N, 0.f);
  Vf dth(NA, 0.f), dtheta(NA, 0.f), dang(n * NA, 0.f);
  if (df.angle.defined())
    for (int64_t i = 0; i < NA; ++i) dtheta[i] = static_cast<float>(tget(df.angle, s, h, i));
  for (int64_t t = n - 1; t >= 0; --t) {
    std::fill(dth.begin(), dth.end(), 0.f);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = (t * R + r) * N;
      rotate_rows_backward(tk, &tk.cosv[t * NA], &tk.sinv[t * NA], &tk.qh[row], &dqh[row],
                           &tg->dq[row], dth.data());
      rotate_rows_backward(tk, &tk.cosv[t * NA], &tk.sinv[t * NA], &tk.kh[row], &dkh[row],
                           &tg->dk[row], dth.data());
      for (int64_t i = 0; i < N; ++i) {
        tg->dqb[r * N + i] += tg->dq[row + i];
        tg->dkb[r * N + i] += tg->dk[row + i];
      }
    }
    for (int64_t i = 0; i < NA; ++i) {
      dtheta[i] += dth[i];
      const float th = tk.tanh_ang[t * NA + i];
      dang[t * NA + i] = dtheta[i] * static_cast<float>(kPi) * tk.dlt[t] * (1.f - th * th);
      ddt[t] += dtheta[i] * static_cast<float>(kPi) * th;
    }
  }

  // Per-token outputs of this (sequence, head): no other task writes them.
  const int64_t l0 = tk.begin;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t l = l0 + t;
    if (gr.v.defined())
      store_row(gr.v, b * gr.v.strides[0] + l * gr.v.strides[1] + h * gr.v.strides[2],
                gr.v.strides[3], P, &dvraw[t * P]);
    if (gr.z.defined())
      store_row(gr.z, b * gr.z.strides[0] + l * gr.z.strides[1] + h * gr.z.strides[2],
                gr.z.strides[3], P, &dz[t * P]);
    if (gr.angles.defined())
      store_row(gr.angles,
                b * gr.angles.strides[0] + l * gr.angles.strides[1] + h * gr.angles.strides[2],
                gr.angles.strides[3], NA, &dang[t * NA]);
  }
  Vf dtrap(n);
  for (int64_t t = 0; t < n; ++t) dtrap[t] = dlam[t] * tk.lam[t] * (1.f - tk.lam[t]);
  auto bhl = [&](const Tensor& t, const Vf& v) {
    if (t.defined() && n > 0)
      store_row(t, b * t.strides[0] + h * t.strides[1] + l0 * t.strides[2], t.strides[2], n, v.data());
  };
  bhl(gr.adt, dadt);
  bhl(gr.dt, ddt);
  bhl(gr.trap, dtrap);

  // Initial states: what remains in the carries (or the final cotangents, for n == 0).
  const States& gi = gr.initial;
  if (gi.ssm.defined()) {
    if (n == 0) {
      dS.setZero();
      if (df.ssm.defined())
        for (int64_t p = 0; p < P; ++p)
          load_row(df.ssm, s * df.ssm.strides[0] + h * df.ssm.strides[1] + p * df.ssm.strides[2],
                   df.ssm.strides[3], N, &dS(p, 0));
    }
    for (int64_t p = 0; p < P; ++p)
      store_row(gi.ssm, s * gi.ssm.strides[0] + h * gi.ssm.strides[1] + p * gi.ssm.strides[2],
                gi.ssm.strides[3], N, &dS(p, 0));
  }
  if (gi.angle.defined())
    store_row(gi.angle, s * gi.angle.strides[0] + h * gi.angle.strides[1], gi.angle.strides[2], NA,
              dtheta.data());
  if (gi.k.defined())
    for (int64_t r = 0; r < R; ++r)
      store_row(gi.k, state_k_offset(gi.k, s, r, h, 0), gi.k.strides[gi.k.ndim - 1], N, &dk0[r * N]);
  if (gi.v.defined())
    store_row(gi.v, s * gi.v.strides[0] + h * gi.v.strides[1], gi.v.strides[2], P, dv0.data());
}

}  // namespace

Status backward(const BackwardArgs& a, const Dims& d) {
  const Inputs& in = a.in;
  const Grads& gr = a.grads;
  const int64_t tasks = d.S * d.H, R = d.R, N = d.N, P = d.P;
  std::vector<HeadParams> params(d.H);
  for (int64_t h = 0; h < d.H; ++h) params[h] = load_params(in, d, h);
  std::vector<TaskGrads> tgs(tasks);
  const float* saved = a.saved.defined() ? static_cast<const float*>(a.saved.data) : nullptr;
  std::vector<int64_t> offsets;
  if (saved) {
    const std::vector<int32_t> want = saved_header(in, d);
    std::vector<int32_t> got(kSavedHeader);
    std::memcpy(got.data(), saved, sizeof(int32_t) * kSavedHeader);
    if (got != want)
      return Status::InvalidArgument(
          "saved: header does not match these inputs (it must come from ForwardArgs::saved of a "
          "cpu-lane forward with the same shapes and chunk_size)");
    offsets = saved_offsets(in, d);
  }
  std::vector<SeqRange> ranges(d.S);
  for (int64_t s = 0; s < d.S; ++s) ranges[s] = seq_range(in, d, s);
#pragma omp parallel for schedule(dynamic, 1) num_threads(resolve_threads(a.num_threads))
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t s = task / d.H, h = task % d.H;
    Task& tk = tls_task;
    gather(in, d, params[h], s, h, true, &tk);
    backward_task(a, tk, saved ? saved + kSavedHeader + offsets[task] : nullptr, &tgs[task]);
  }

  // Fixed-order reductions: q/k over the heads of a group (parallel over blocks of tokens; the
  // order inside each sum is fixed), parameters over sequences.
  const int64_t hpg = d.heads_per_group();
  constexpr int64_t kTokBlock = 64;
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (sequence, first token)
  for (int64_t s = 0; s < d.S; ++s)
    for (int64_t t = 0; t < ranges[s].end - ranges[s].begin; t += kTokBlock) blocks.push_back({s, t});
  for (auto [grad, is_q] : {std::pair{&gr.q, true}, std::pair{&gr.k, false}}) {
    if (!grad->defined()) continue;
    const int64_t st = grad->strides[grad->ndim - 1];
#pragma omp parallel for schedule(static) num_threads(resolve_threads(a.num_threads))
    for (size_t bi = 0; bi < blocks.size(); ++bi) {
      const auto [s, tb] = blocks[bi];
      const SeqRange rg = ranges[s];
      const int64_t te = std::min(rg.end - rg.begin, tb + kTokBlock);
      Vf acc(N);
      for (int64_t g = 0; g < d.G; ++g)
        for (int64_t t = tb; t < te; ++t)
          for (int64_t r = 0; r < R; ++r) {
            const int64_t row = (t * R + r) * N;
            const TaskGrads& first = tgs[s * d.H + g * hpg];
            const float* src0 = is_q ? &first.dq[row] : &first.dk[row];
            std::memcpy(acc.data(), src0, sizeof(float) * N);
            for (int64_t h = g * hpg + 1; h < (g + 1) * hpg; ++h) {
              const float* src = is_q ? &tgs[s * d.H + h].dq[row] : &tgs[s * d.H + h].dk[row];
              for (int64_t i = 0; i < N; ++i) acc[i] += src[i];
            }
            store_row(*grad, qk_offset(*grad, rg.batch, rg.begin + t, r, g, 0), st, N, acc.data());
          }
    }
  }
  for (int64_t h = 0; h < d.H; ++h) {
    Vf dqb(R * N, 0.f), dkb(R * N, 0.f), dpsi(R * P, 0.f), dzeta(R * P, 0.f), dphi(R * P, 0.f),
        dw(P, 0.f);
    float dskip = 0.f;
    for (int64_t s = 0; s < d.S; ++s) {
      const TaskGrads& tg = tgs[s * d.H + h];
      for (int64_t i = 0; i < R * N; ++i) dqb[i] += tg.dqb[i], dkb[i] += tg.dkb[i];
      for (int64_t i = 0; i < R * P; ++i)
        dpsi[i] += tg.dpsi[i], dzeta[i] += tg.dzeta[i], dphi[i] += tg.dphi[i];
      for (int64_t i = 0; i < P; ++i) dw[i] += tg.dw[i];
      dskip += tg.dskip;
    }
    for (auto [grad, src] : {std::pair{&gr.q_bias, &dqb}, std::pair{&gr.k_bias, &dkb}})
      if (grad->defined())
        for (int64_t r = 0; r < R; ++r)
          store_row(*grad, bias_offset(*grad, h, r, 0), grad->strides[grad->ndim - 1], N,
                    &(*src)[r * N]);
    for (auto [grad, src] :
         {std::pair{&gr.mimo_v, &dpsi}, std::pair{&gr.mimo_z, &dzeta}, std::pair{&gr.mimo_o, &dphi}})
      if (grad->defined())
        for (int64_t r = 0; r < R; ++r)
          store_row(*grad, h * grad->strides[0] + r * grad->strides[1], grad->strides[2], P,
                    &(*src)[r * P]);
    if (gr.norm_weight.defined())
      store_row(gr.norm_weight, h * gr.norm_weight.strides[0], gr.norm_weight.strides[1], P,
                dw.data());
    if (gr.d.defined()) tset(gr.d, dskip, h);
  }
  return Status::Ok();
}

// Decode: the recurrence of one token per (batch, head), directly (DESIGN §2.2), reading every
// old state of a (batch, head) before writing its new one, so the state buffers update in place.
Status step(const StepArgs& a, const Dims& d) {
  const int64_t R = d.R, N = d.N, P = d.P, NA = d.NA;
  const ForwardArgs f = step_as_forward(a);  // one-token views: shared index helpers
  const Inputs& in = f.in;
  std::vector<HeadParams> params(d.H);
  for (int64_t h = 0; h < d.H; ++h) params[h] = load_params(in, d, h);
  const int64_t tasks = d.B * d.H;
  // Threads only pay off past a few MB of state (a parallel region costs microseconds).
  const int threads = tasks * P * N < (int64_t{1} << 22) ? 1 : resolve_threads(0);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / d.H, h = task % d.H, g = h / d.heads_per_group();
    const HeadParams& hp = params[h];
    const States& st = a.state;
    auto psi = [&](int64_t r, int64_t x) { return hp.psi.empty() ? 1.f : hp.psi[r * P + x]; };
    const float dlt = static_cast<float>(tget(a.dt, b, h));
    const float lam = 1.f / (1.f + std::exp(-static_cast<float>(tget(a.trap, b, h))));
    const float alpha = std::exp(static_cast<float>(tget(a.adt, b, h)));
    const float beta = (1.f - lam) * dlt * alpha, gam = lam * dlt;
    // Angles (float64 accumulation, wrapped), then rotated q and k.
    Vf cosv(NA), sinv(NA), theta(NA);
    for (int64_t i = 0; i < NA; ++i) {
      const double th = tget(st.angle, b, h, i) +
                        static_cast<double>(static_cast<float>(kPi) *
                                            std::tanh(static_cast<float>(tget(a.angles, b, h, i))) *
                                            dlt);
      theta[i] = static_cast<float>(wrap_angle(th));
      cosv[i] = std::cos(theta[i]);
      sinv[i] = std::sin(theta[i]);
    }
    Task tk;  // only the fields rotate_rows reads
    tk.d = &d;
    tk.pairing = a.rope_pairing;
    Vf qh(R * N), kh(R * N), kp(R * N), row(N), v(P), vp(P), y(R * P), out(d.per_rank_out ? R * P : P);
    for (int64_t r = 0; r < R; ++r) {
      load_row(a.q, step_qk_offset(a.q, b, r, g, 0), a.q.strides[a.q.ndim - 1], N, row.data());
      for (int64_t n = 0; n < N; ++n) row[n] += hp.qb[r * N + n];
      rotate_rows(tk, cosv.data(), sinv.data(), row.data(), &qh[r * N]);
      load_row(a.k, step_qk_offset(a.k, b, r, g, 0), a.k.strides[a.k.ndim - 1], N, row.data());
      for (int64_t n = 0; n < N; ++n) row[n] += hp.kb[r * N + n];
      rotate_rows(tk, cosv.data(), sinv.data(), row.data(), &kh[r * N]);
      load_row(st.k, state_k_offset(st.k, b, r, h, 0), st.k.strides[st.k.ndim - 1], N, &kp[r * N]);
    }
    load_row(a.v, b * a.v.strides[0] + h * a.v.strides[1], a.v.strides[2], P, v.data());
    load_row(st.v, b * st.v.strides[0] + h * st.v.strides[1], st.v.strides[2], P, vp.data());
    // S <- alpha S + sum_r (beta vp psi_r) kp_r^T + (gam v psi_r) k_r^T;  y_r = S q_r + D v psi_r.
    std::fill(y.begin(), y.end(), 0.f);
    for (int64_t x = 0; x < P; ++x) {
      load_row(st.ssm, b * st.ssm.strides[0] + h * st.ssm.strides[1] + x * st.ssm.strides[2],
               st.ssm.strides[3], N, row.data());
      for (int64_t n = 0; n < N; ++n) row[n] *= alpha;
      for (int64_t r = 0; r < R; ++r) {
        const float cb = beta * vp[x] * psi(r, x), cg = gam * v[x] * psi(r, x);
        for (int64_t n = 0; n < N; ++n) row[n] += cb * kp[r * N + n] + cg * kh[r * N + n];
      }
      store_row(st.ssm, b * st.ssm.strides[0] + h * st.ssm.strides[1] + x * st.ssm.strides[2],
                st.ssm.strides[3], N, row.data());
      // Eigen's vectorized dot (a scalar float sum is one long dependency chain); the buffers
      // are aligned, so its summation order depends on shapes only.
      const Eigen::Map<const Eigen::VectorXf> srow(row.data(), N);
      for (int64_t r = 0; r < R; ++r)
        y[r * P + x] = srow.dot(Eigen::Map<const Eigen::VectorXf>(&qh[r * N], N)) +
                       hp.dskip * v[x] * psi(r, x);
    }
    for (int64_t r = 0; r < R; ++r)
      store_row(st.k, state_k_offset(st.k, b, r, h, 0), st.k.strides[st.k.ndim - 1], N, &kh[r * N]);
    store_row(st.v, b * st.v.strides[0] + h * st.v.strides[1], st.v.strides[2], P, v.data());
    for (int64_t i = 0; i < NA; ++i) tset(st.angle, theta[i], b, h, i);
    // Output stage (shared with the prefill lanes).
    Vf z;
    EpilogueParams<float> epi;
    epi.R = R, epi.P = P, epi.reduce = !d.per_rank_out, epi.eps = a.norm_eps;
    epi.zeta = hp.zeta.empty() ? nullptr : hp.zeta.data();
    epi.phi = hp.phi.empty() ? nullptr : hp.phi.data();
    epi.norm_w = hp.w.empty() ? nullptr : hp.w.data();
    if (a.z.defined()) {
      z.resize(P);
      load_row(a.z, b * a.z.strides[0] + h * a.z.strides[1], a.z.strides[2], P, z.data());
      epi.z = z.data();
    }
    epilogue_forward(epi, y.data(), out.data());
    if (d.per_rank_out) {
      for (int64_t r = 0; r < R; ++r)
        store_row(a.out, b * a.out.strides[0] + r * a.out.strides[1] + h * a.out.strides[2],
                  a.out.strides[3], P, &out[r * P]);
    } else {
      store_row(a.out, b * a.out.strides[0] + h * a.out.strides[1], a.out.strides[2], P, out.data());
    }
  }
  return Status::Ok();
}

int max_threads() { return omp_get_max_threads(); }

std::string matrix_library() {
  std::string s = "Eigen " + std::to_string(EIGEN_WORLD_VERSION) + "." +
                  std::to_string(EIGEN_MAJOR_VERSION) + "." + std::to_string(EIGEN_MINOR_VERSION);
  s += std::string(" (") + Eigen::SimdInstructionSetsInUse() + ")";
  return s;
}

}  // namespace mamba3::cpu
