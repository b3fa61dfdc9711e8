// Token-by-token recurrence (DESIGN.md §2.2) and its adjoint. Deliberately plain: one
// (sequence, head) at a time, every quantity written out as in the definition. Per-token
// states for the backward are recomputed from checkpoints every kBlock tokens.
#include "reference/reference.h"

#include <cmath>
#include <vector>

#include "common/epilogue.h"
#include "common/layout.h"
#include "core/step_view.h"
#include "core/validate.h"

namespace mamba3::reference {
namespace {

constexpr int64_t kBlock = 64;  // checkpoint interval of the backward; does not affect results

template <typename T>
using Vec = std::vector<T>;

// Everything one (sequence, head) needs, gathered into contiguous arrays of T.
template <typename T>
struct SeqHead {
  const Dims* d = nullptr;
  RopePairing pairing = RopePairing::kInterleaved;
  int64_t s = 0, h = 0, g = 0, batch = 0, begin = 0, n = 0;
  Vec<T> q, k;            // (n, R, N) biased, not rotated
  Vec<T> v, z;            // (n, P)
  Vec<T> lam, dlt, alpha, tanh_ang;  // (n), (n), (n), (n, NA)
  Vec<T> psi, zeta, phi, w;  // (R, P), (R, P), (R, P), (P); empty when absent
  T dskip = T(0);
  Vec<T> th0, s0, k0, v0;  // (NA), (P, N), (R, N), (P); zero without initial states
  EpilogueParams<T> epi;

  T psi_at(int64_t r, int64_t p) const { return psi.empty() ? T(1) : psi[r * d->P + p]; }
};

template <typename T>
void load(const Inputs& in, const Dims& d, int64_t s, int64_t h, SeqHead<T>* o) {
  const SeqRange range = seq_range(in, d, s);
  const int64_t R = d.R, N = d.N, P = d.P, NA = d.NA;
  o->d = &d;
  o->pairing = in.rope_pairing;
  o->s = s, o->h = h, o->g = h / d.heads_per_group();
  o->batch = range.batch, o->begin = range.begin, o->n = range.end - range.begin;
  const int64_t n = o->n, b = o->batch, g = o->g;
  o->q.assign(n * R * N, T(0));
  o->k.assign(n * R * N, T(0));
  o->v.assign(n * P, T(0));
  o->z.assign(in.z.defined() ? n * P : 0, T(0));
  o->lam.assign(n, T(0));
  o->dlt.assign(n, T(0));
  o->alpha.assign(n, T(0));
  o->tanh_ang.assign(n * NA, T(0));
  for (int64_t t = 0; t < n; ++t) {
    const int64_t l = o->begin + t;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < N; ++i) {
        o->q[(t * R + r) * N + i] = static_cast<T>(load(in.q, qk_offset(in.q, b, l, r, g, i))) +
                                    static_cast<T>(load(in.q_bias, bias_offset(in.q_bias, h, r, i)));
        o->k[(t * R + r) * N + i] = static_cast<T>(load(in.k, qk_offset(in.k, b, l, r, g, i))) +
                                    static_cast<T>(load(in.k_bias, bias_offset(in.k_bias, h, r, i)));
      }
    for (int64_t p = 0; p < P; ++p) {
      o->v[t * P + p] = static_cast<T>(tget(in.v, b, l, h, p));
      if (in.z.defined()) o->z[t * P + p] = static_cast<T>(tget(in.z, b, l, h, p));
    }
    o->lam[t] = sigmoid(static_cast<T>(tget(in.trap, b, h, l)));
    o->dlt[t] = static_cast<T>(tget(in.dt, b, h, l));
    o->alpha[t] = std::exp(static_cast<T>(tget(in.adt, b, h, l)));
    for (int64_t i = 0; i < NA; ++i)
      o->tanh_ang[t * NA + i] = std::tanh(static_cast<T>(tget(in.angles, b, l, h, i)));
  }
  auto param = [&](const Tensor& t, Vec<T>* dst) {
    dst->clear();
    if (!t.defined()) return;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t p = 0; p < P; ++p) dst->push_back(static_cast<T>(tget(t, h, r, p)));
  };
  param(in.mimo_v, &o->psi);
  param(in.mimo_z, &o->zeta);
  param(in.mimo_o, &o->phi);
  o->w.clear();
  if (in.norm_weight.defined())
    for (int64_t p = 0; p < P; ++p) o->w.push_back(static_cast<T>(tget(in.norm_weight, h, p)));
  o->dskip = in.d.defined() ? static_cast<T>(tget(in.d, h)) : T(0);
  o->th0.assign(NA, T(0));
  o->s0.assign(P * N, T(0));
  o->k0.assign(R * N, T(0));
  o->v0.assign(P, T(0));
  if (in.initial.all()) {
    for (int64_t i = 0; i < NA; ++i) o->th0[i] = static_cast<T>(tget(in.initial.angle, s, h, i));
    for (int64_t p = 0; p < P; ++p)
      for (int64_t i = 0; i < N; ++i)
        o->s0[p * N + i] = static_cast<T>(tget(in.initial.ssm, s, h, p, i));
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < N; ++i)
        o->k0[r * N + i] =
            static_cast<T>(load(in.initial.k, state_k_offset(in.initial.k, s, r, h, i)));
    for (int64_t p = 0; p < P; ++p) o->v0[p] = static_cast<T>(tget(in.initial.v, s, h, p));
  }
  o->epi.R = R;
  o->epi.P = P;
  o->epi.reduce = !d.per_rank_out;
  o->epi.zeta = o->zeta.empty() ? nullptr : o->zeta.data();
  o->epi.phi = o->phi.empty() ? nullptr : o->phi.data();
  o->epi.norm_w = o->w.empty() ? nullptr : o->w.data();
  o->epi.eps = static_cast<T>(in.norm_eps);
}

// out = Rot(theta) x over the NA rope pairs.
template <typename T>
void rotate(const SeqHead<T>& sh, const T* theta, const T* x, T* out) {
  const int64_t N = sh.d->N;
  for (int64_t i = 0; i < N; ++i) out[i] = x[i];
  for (int64_t i = 0; i < sh.d->NA; ++i) {
    int64_t a, b;
    rope_pair(sh.pairing, N, i, &a, &b);
    const T c = std::cos(theta[i]), sn = std::sin(theta[i]);
    out[a] = x[a] * c - x[b] * sn;
    out[b] = x[a] * sn + x[b] * c;
  }
}

// Adjoint of rotate: dx += Rot(theta)^T dout; dtheta_i += dout_a * (-b') + dout_b * a'.
template <typename T>
void rotate_backward(const SeqHead<T>& sh, const T* theta, const T* rotated, const T* dout, T* dx,
                     T* dtheta) {
  const int64_t N = sh.d->N;
  Vec<T> tmp(dout, dout + N);
  for (int64_t i = 0; i < sh.d->NA; ++i) {
    int64_t a, b;
    rope_pair(sh.pairing, N, i, &a, &b);
    const T c = std::cos(theta[i]), sn = std::sin(theta[i]);
    tmp[a] = dout[a] * c + dout[b] * sn;
    tmp[b] = -dout[a] * sn + dout[b] * c;
    dtheta[i] += -dout[a] * rotated[b] + dout[b] * rotated[a];
  }
  for (int64_t i = 0; i < N; ++i) dx[i] += tmp[i];
}

// Advances theta, S, kprev, vprev over token t; writes the rotated q (R, N) and y (R, P).
template <typename T>
void token_forward(const SeqHead<T>& sh, int64_t t, T* theta, T* S, T* kprev, T* vprev, T* qhat,
                   T* y) {
  const int64_t R = sh.d->R, N = sh.d->N, P = sh.d->P, NA = sh.d->NA;
  const T lam = sh.lam[t], dlt = sh.dlt[t], alpha = sh.alpha[t];
  for (int64_t i = 0; i < NA; ++i)
    theta[i] += static_cast<T>(kPi) * sh.tanh_ang[t * NA + i] * dlt;
  Vec<T> khat(R * N);
  for (int64_t r = 0; r < R; ++r) {
    rotate(sh, theta, &sh.q[(t * R + r) * N], &qhat[r * N]);
    rotate(sh, theta, &sh.k[(t * R + r) * N], &khat[r * N]);
  }
  const T beta = (T(1) - lam) * dlt * alpha, gam = lam * dlt;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < N; ++i) {
      T acc = alpha * S[p * N + i];
      for (int64_t r = 0; r < R; ++r)
        acc += beta * (vprev[p] * sh.psi_at(r, p)) * kprev[r * N + i] +
               gam * (sh.v[t * P + p] * sh.psi_at(r, p)) * khat[r * N + i];
      S[p * N + i] = acc;
    }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t p = 0; p < P; ++p) {
      T acc = 0;
      for (int64_t i = 0; i < N; ++i) acc += S[p * N + i] * qhat[r * N + i];
      y[r * P + p] = acc + sh.dskip * sh.v[t * P + p] * sh.psi_at(r, p);
    }
  for (int64_t i = 0; i < R * N; ++i) kprev[i] = khat[i];
  for (int64_t p = 0; p < P; ++p) vprev[p] = sh.v[t * P + p];
}

template <typename T>
Status forward_impl(const ForwardArgs& a, const Dims& d) {
  const Inputs& in = a.in;
  const int64_t R = d.R, N = d.N, P = d.P, NA = d.NA;
  const int64_t out_cols = d.per_rank_out ? R * P : P;
  for (int64_t s = 0; s < d.S; ++s)
    for (int64_t h = 0; h < d.H; ++h) {
      SeqHead<T> sh;
      load(in, d, s, h, &sh);
      Vec<T> theta = sh.th0, S = sh.s0, kprev = sh.k0, vprev = sh.v0;
      Vec<T> qhat(R * N), y(R * P), out(out_cols);
      for (int64_t t = 0; t < sh.n; ++t) {
        token_forward(sh, t, theta.data(), S.data(), kprev.data(), vprev.data(), qhat.data(),
                      y.data());
        sh.epi.z = sh.z.empty() ? nullptr : &sh.z[t * P];
        epilogue_forward(sh.epi, y.data(), out.data());
        const int64_t l = sh.begin + t;
        for (int64_t p = 0; p < P; ++p) {
          if (d.per_rank_out)
            for (int64_t r = 0; r < R; ++r) tset(a.out, out[r * P + p], sh.batch, l, r, h, p);
          else
            tset(a.out, out[p], sh.batch, l, h, p);
        }
      }
      const States& f = a.final_states;
      if (f.all()) {
        for (int64_t i = 0; i < NA; ++i) tset(f.angle, wrap_angle(theta[i]), s, h, i);
        for (int64_t p = 0; p < P; ++p)
          for (int64_t i = 0; i < N; ++i) tset(f.ssm, S[p * N + i], s, h, p, i);
        for (int64_t r = 0; r < R; ++r)
          for (int64_t i = 0; i < N; ++i)
            store(f.k, state_k_offset(f.k, s, r, h, i), kprev[r * N + i]);
        for (int64_t p = 0; p < P; ++p) tset(f.v, vprev[p], s, h, p);
      }
    }
  return Status::Ok();
}

template <typename T>
struct GradAccums {
  Accum<T> q, k, v, adt, dt, trap, q_bias, k_bias, angles, d, z, mimo_v, mimo_z, mimo_o,
      norm_weight, th0, s0, k0, v0;
  void init(const Grads& g) {
    q.init(g.q), k.init(g.k), v.init(g.v), adt.init(g.adt), dt.init(g.dt), trap.init(g.trap);
    q_bias.init(g.q_bias), k_bias.init(g.k_bias), angles.init(g.angles), d.init(g.d);
    z.init(g.z), mimo_v.init(g.mimo_v), mimo_z.init(g.mimo_z), mimo_o.init(g.mimo_o);
    norm_weight.init(g.norm_weight), th0.init(g.initial.angle), s0.init(g.initial.ssm);
    k0.init(g.initial.k), v0.init(g.initial.v);
  }
  void flush(const Grads& g) const {
    q.flush(g.q), k.flush(g.k), v.flush(g.v), adt.flush(g.adt), dt.flush(g.dt);
    trap.flush(g.trap), q_bias.flush(g.q_bias), k_bias.flush(g.k_bias);
    angles.flush(g.angles), d.flush(g.d), z.flush(g.z), mimo_v.flush(g.mimo_v);
    mimo_z.flush(g.mimo_z), mimo_o.flush(g.mimo_o), norm_weight.flush(g.norm_weight);
    th0.flush(g.initial.angle), s0.flush(g.initial.ssm), k0.flush(g.initial.k);
    v0.flush(g.initial.v);
  }
};

// Adjoint of the recurrence for one (sequence, head); accumulates into `acc`.
template <typename T>
void backward_seq_head(const BackwardArgs& a, const Dims& d, const SeqHead<T>& sh,
                       GradAccums<T>* acc) {
  const int64_t R = d.R, N = d.N, P = d.P, NA = d.NA, n = sh.n;
  const int64_t s = sh.s, h = sh.h, g = sh.g, b = sh.batch;
  const int64_t out_cols = d.per_rank_out ? R * P : P;
  const States& df = a.d_final;

  // Adjoint carries (w.r.t. the quantities after the current token).
  Vec<T> dS(P * N, T(0)), dtheta(NA, T(0)), dkcarry(R * N, T(0)), dvcarry(P, T(0));
  if (df.ssm.defined())
    for (int64_t p = 0; p < P; ++p)
      for (int64_t i = 0; i < N; ++i) dS[p * N + i] = static_cast<T>(tget(df.ssm, s, h, p, i));
  if (df.angle.defined())
    for (int64_t i = 0; i < NA; ++i) dtheta[i] = static_cast<T>(tget(df.angle, s, h, i));
  if (df.k.defined())
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < N; ++i)
        dkcarry[r * N + i] = static_cast<T>(load(df.k, state_k_offset(df.k, s, r, h, i)));
  if (df.v.defined())
    for (int64_t p = 0; p < P; ++p) dvcarry[p] = static_cast<T>(tget(df.v, s, h, p));

  // Forward sweep: theta after every token and S before every block.
  Vec<T> thetas(n * NA);
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  Vec<T> s_ckpt(nblocks * P * N), k_ckpt(nblocks * R * N), v_ckpt(nblocks * P);
  {
    Vec<T> theta = sh.th0, S = sh.s0, kprev = sh.k0, vprev = sh.v0, qhat(R * N), y(R * P);
    for (int64_t t = 0; t < n; ++t) {
      if (t % kBlock == 0) {
        std::copy(S.begin(), S.end(), &s_ckpt[(t / kBlock) * P * N]);
        std::copy(kprev.begin(), kprev.end(), &k_ckpt[(t / kBlock) * R * N]);
        std::copy(vprev.begin(), vprev.end(), &v_ckpt[(t / kBlock) * P]);
      }
      token_forward(sh, t, theta.data(), S.data(), kprev.data(), vprev.data(), qhat.data(),
                    y.data());
      std::copy(theta.begin(), theta.end(), &thetas[t * NA]);
    }
  }

  // Per-(sequence, head) parameter gradients, summed over time here.
  Vec<T> dpsi(R * P, T(0)), dzeta(R * P, T(0)), dphi(R * P, T(0)), dw(P, T(0));
  T dskip = T(0);
  Vec<T> dqb(R * N, T(0)), dkb(R * N, T(0));

  Vec<T> blockS((kBlock + 1) * P * N), blockK((kBlock + 1) * R * N), blockV((kBlock + 1) * P);
  Vec<T> qhat_all(kBlock * R * N), y_all(kBlock * R * P);
  Vec<T> khat(R * N), dy(R * P), dout(out_cols), dz(P), dqhat(R * N), dkhat(R * N), dv(R * P),
      dxp(R * P), dkp(R * N), dq_t(R * N), dk_t(R * N);
  for (int64_t blk = nblocks - 1; blk >= 0; --blk) {
    const int64_t t0 = blk * kBlock, t1 = std::min(n, t0 + kBlock);
    // Recompute the block: blockS[j] = S before token t0 + j (j = 0 .. t1 - t0).
    Vec<T> theta(NA), S(&s_ckpt[blk * P * N], &s_ckpt[blk * P * N] + P * N);
    Vec<T> kprev(&k_ckpt[blk * R * N], &k_ckpt[blk * R * N] + R * N);
    Vec<T> vprev(&v_ckpt[blk * P], &v_ckpt[blk * P] + P);
    if (t0 == 0)
      theta = sh.th0;
    else
      theta.assign(&thetas[(t0 - 1) * NA], &thetas[(t0 - 1) * NA] + NA);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t - t0;
      std::copy(S.begin(), S.end(), &blockS[j * P * N]);
      std::copy(kprev.begin(), kprev.end(), &blockK[j * R * N]);
      std::copy(vprev.begin(), vprev.end(), &blockV[j * P]);
      token_forward(sh, t, theta.data(), S.data(), kprev.data(), vprev.data(),
                    &qhat_all[j * R * N], &y_all[j * R * P]);
    }
    std::copy(S.begin(), S.end(), &blockS[(t1 - t0) * P * N]);

    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t j = t - t0, l = sh.begin + t;
      const T* S_t = &blockS[(j + 1) * P * N];
      const T* S_prev = &blockS[j * P * N];
      const T* kp = &blockK[j * R * N];   // rotated k of token t-1 (or k0)
      const T* vp = &blockV[j * P];       // raw v of token t-1 (or v0)
      const T* qhat = &qhat_all[j * R * N];
      const T* y = &y_all[j * R * P];
      const T* theta_t = &thetas[t * NA];
      const T lam = sh.lam[t], dlt = sh.dlt[t], alpha = sh.alpha[t];
      for (int64_t r = 0; r < R; ++r) rotate(sh, theta_t, &sh.k[(t * R + r) * N], &khat[r * N]);

      // Output stage.
      for (int64_t c = 0; c < out_cols; ++c) {
        const int64_t r = d.per_rank_out ? c / P : 0, p = c % P;
        dout[c] = d.per_rank_out ? static_cast<T>(tget(a.d_out, b, l, r, h, p))
                                 : static_cast<T>(tget(a.d_out, b, l, h, p));
      }
      std::fill(dz.begin(), dz.end(), T(0));
      EpilogueParams<T> epi = sh.epi;
      epi.z = sh.z.empty() ? nullptr : &sh.z[t * P];
      epilogue_backward(epi, y, dout.data(), dy.data(), dz.data(), dzeta.data(), dphi.data(),
                        dw.data());

      // y_r = S_t qhat_r + D v_r.
      for (int64_t r = 0; r < R; ++r)
        for (int64_t p = 0; p < P; ++p) {
          const T dyv = dy[r * P + p];
          for (int64_t i = 0; i < N; ++i) dS[p * N + i] += dyv * qhat[r * N + i];
          dskip += dyv * sh.v[t * P + p] * sh.psi_at(r, p);
          dv[r * P + p] = sh.dskip * dyv;
        }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; i < N; ++i) {
          T acc = 0;
          for (int64_t p = 0; p < P; ++p) acc += S_t[p * N + i] * dy[r * P + p];
          dqhat[r * N + i] = acc;
        }

      // S_t = alpha S_prev + beta sum_r xp_r kp_r^T + gam sum_r v_r khat_r^T.
      const T beta = (T(1) - lam) * dlt * alpha, gam = lam * dlt;
      T dS_W = 0, dS_U = 0, dS_Sprev = 0;
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t p = 0; p < P; ++p) {
          T sk = 0, skp = 0;
          for (int64_t i = 0; i < N; ++i) {
            sk += dS[p * N + i] * khat[r * N + i];
            skp += dS[p * N + i] * kp[r * N + i];
          }
          const T vr = sh.v[t * P + p] * sh.psi_at(r, p), xr = vp[p] * sh.psi_at(r, p);
          dS_W += vr * sk;
          dS_U += xr * skp;
          dv[r * P + p] += gam * sk;
          dxp[r * P + p] = beta * skp;
        }
        for (int64_t i = 0; i < N; ++i) {
          T sv = 0, sx = 0;
          for (int64_t p = 0; p < P; ++p) {
            sv += dS[p * N + i] * sh.v[t * P + p] * sh.psi_at(r, p);
            sx += dS[p * N + i] * vp[p] * sh.psi_at(r, p);
          }
          dkhat[r * N + i] = dkcarry[r * N + i] + gam * sv;
          dkp[r * N + i] = beta * sx;
        }
      }
      for (int64_t i = 0; i < P * N; ++i) dS_Sprev += dS[i] * S_prev[i];
      const T dlam = dlt * (dS_W - alpha * dS_U);
      T ddlt = lam * dS_W + (T(1) - lam) * alpha * dS_U;
      const T dalpha = dS_Sprev + (T(1) - lam) * dlt * dS_U;

      // v_r = V_t * psi_r; the current token's raw v also receives the carry of token t+1.
      Vec<T> dV(dvcarry);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t p = 0; p < P; ++p) {
          dV[p] += dv[r * P + p] * sh.psi_at(r, p);
          dpsi[r * P + p] += dv[r * P + p] * sh.v[t * P + p] + dxp[r * P + p] * vp[p];
        }
      // Carries for token t-1 (or the initial states).
      for (int64_t p = 0; p < P; ++p) {
        T acc = 0;
        for (int64_t r = 0; r < R; ++r) acc += dxp[r * P + p] * sh.psi_at(r, p);
        dvcarry[p] = acc;
      }
      dkcarry = dkp;

      // Rotations: q_hat and k_hat depend on theta_t and the biased inputs.
      Vec<T> dth(NA, T(0));
      std::fill(dq_t.begin(), dq_t.end(), T(0));
      std::fill(dk_t.begin(), dk_t.end(), T(0));
      for (int64_t r = 0; r < R; ++r) {
        rotate_backward(sh, theta_t, &qhat[r * N], &dqhat[r * N], &dq_t[r * N], dth.data());
        rotate_backward(sh, theta_t, &khat[r * N], &dkhat[r * N], &dk_t[r * N], dth.data());
      }
      // theta_t = theta_{t-1} + pi tanh(angles_t) dt_t.
      for (int64_t i = 0; i < NA; ++i) {
        dtheta[i] += dth[i];
        const T th = sh.tanh_ang[t * NA + i];
        if (acc->angles.on)
          acc->angles[((b * d.L + l) * d.H + h) * NA + i] +=
              dtheta[i] * static_cast<T>(kPi) * dlt * (T(1) - th * th);
        ddlt += dtheta[i] * static_cast<T>(kPi) * th;
      }

      // Scatter per-token gradients.
      const int64_t bhl = (b * d.H + h) * d.L + l;
      if (acc->adt.on) acc->adt[bhl] += dalpha * alpha;
      if (acc->dt.on) acc->dt[bhl] += ddlt;
      if (acc->trap.on) acc->trap[bhl] += dlam * lam * (T(1) - lam);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; i < N; ++i) {
          const int64_t qi = (((b * d.L + l) * R + r) * d.G + g) * N + i;
          if (acc->q.on) acc->q[qi] += dq_t[r * N + i];
          if (acc->k.on) acc->k[qi] += dk_t[r * N + i];
          dqb[r * N + i] += dq_t[r * N + i];
          dkb[r * N + i] += dk_t[r * N + i];
        }
      for (int64_t p = 0; p < P; ++p) {
        if (acc->v.on) acc->v[((b * d.L + l) * d.H + h) * P + p] += dV[p];
        if (acc->z.on) acc->z[((b * d.L + l) * d.H + h) * P + p] += dz[p];
      }
      for (int64_t i = 0; i < P * N; ++i) dS[i] *= alpha;
    }
  }

  // What remains in the carries belongs to the initial states.
  if (acc->th0.on)
    for (int64_t i = 0; i < NA; ++i) acc->th0[(s * d.H + h) * NA + i] += dtheta[i];
  if (acc->s0.on)
    for (int64_t i = 0; i < P * N; ++i) acc->s0[(s * d.H + h) * P * N + i] += dS[i];
  if (acc->k0.on)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < N; ++i) acc->k0[((s * R + r) * d.H + h) * N + i] += dkcarry[r * N + i];
  if (acc->v0.on)
    for (int64_t p = 0; p < P; ++p) acc->v0[(s * d.H + h) * P + p] += dvcarry[p];
  // psi also multiplies v0 in the first token's beta term: accounted for in dpsi via vp.
  for (int64_t r = 0; r < R; ++r)
    for (int64_t p = 0; p < P; ++p) {
      if (acc->mimo_v.on) acc->mimo_v[(h * R + r) * P + p] += dpsi[r * P + p];
      if (acc->mimo_z.on) acc->mimo_z[(h * R + r) * P + p] += dzeta[r * P + p];
      if (acc->mimo_o.on) acc->mimo_o[(h * R + r) * P + p] += dphi[r * P + p];
    }
  if (acc->norm_weight.on)
    for (int64_t p = 0; p < P; ++p) acc->norm_weight[h * P + p] += dw[p];
  if (acc->d.on) acc->d[h] += dskip;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < N; ++i) {
      if (acc->q_bias.on) acc->q_bias[(h * R + r) * N + i] += dqb[r * N + i];
      if (acc->k_bias.on) acc->k_bias[(h * R + r) * N + i] += dkb[r * N + i];
    }
}

template <typename T>
Status backward_impl(const BackwardArgs& a, const Dims& d) {
  GradAccums<T> acc;
  acc.init(a.grads);
  for (int64_t s = 0; s < d.S; ++s)
    for (int64_t h = 0; h < d.H; ++h) {
      SeqHead<T> sh;
      load(a.in, d, s, h, &sh);
      backward_seq_head(a, d, sh, &acc);
    }
  acc.flush(a.grads);
  return Status::Ok();
}

}  // namespace

template <typename T>
Status forward(const ForwardArgs& args) {
  Dims d;
  Status st = validate_forward(args, &d);
  if (!st.ok()) return st;
  return forward_impl<T>(args, d);
}

template <typename T>
Status backward(const BackwardArgs& args) {
  Dims d;
  Status st = validate_backward(args, &d);
  if (!st.ok()) return st;
  return backward_impl<T>(args, d);
}

template <typename T>
Status step(const StepArgs& args) {
  Dims d;
  Status st = validate_step(args, &d);
  if (!st.ok()) return st;
  ForwardArgs f = step_as_forward(args);
  Dims fd;
  st = validate_forward(f, &fd);
  if (!st.ok()) return Status::Internal("step view: " + st.message());
  return forward_impl<T>(f, fd);
}

template Status forward<double>(const ForwardArgs&);
template Status forward<float>(const ForwardArgs&);
template Status backward<double>(const BackwardArgs&);
template Status backward<float>(const BackwardArgs&);
template Status step<double>(const StepArgs&);
template Status step<float>(const StepArgs&);

}  // namespace mamba3::reference
