// The reference lane against itself and against hand arithmetic: an integer-exact plumbing
// case, split-and-continue (forward and gradients), decode steps == prefill, packed sequences
// == separate runs, and central finite differences of every input.
#include <gtest/gtest.h>

#include <cmath>

#include "test_util.h"

namespace mamba3::test {
namespace {

check::Problem small_problem(int64_t L, int64_t R, uint64_t seed, bool norm = true) {
  check::ProblemConfig c = check::default_config(2, L, 4, 2, 8, 6, R, seed);
  c.NA = 3;
  c.has_states = true;
  c.has_norm = norm;
  return check::Problem(c);
}

// Integer-exact plumbing: decay 1, angle 0, lambda 1/2, dt 1, small integers. Every
// intermediate is a small dyadic rational, so all lanes must agree exactly with hand math.
TEST(Plumbing, IntegerExactCaseIsExactOnEveryLane) {
  check::ProblemConfig c = check::default_config(1, 9, 2, 1, 4, 3, 2, 0);
  c.NA = 2;
  c.has_z = false;
  c.has_mimo_v = c.has_mimo_z = false;  // psi = 1, zeta unused
  c.has_mimo_o = true;
  check::Problem p(c);
  auto ints = [](check::HostTensor& t, int lo, int hi, uint64_t seed) {
    for (int64_t i = 0; i < t.numel(); ++i)
      t.set(i, lo + static_cast<int>((i * 2654435761u + seed * 97) % (hi - lo + 1)));
  };
  ints(p.q, -2, 2, 1), ints(p.k, -2, 2, 2), ints(p.v, -3, 3, 3), ints(p.q_bias, -1, 1, 4);
  ints(p.k_bias, -1, 1, 5), ints(p.d, -2, 2, 6), ints(p.mimo_o, 1, 2, 7);
  for (int64_t i = 0; i < p.adt.numel(); ++i) p.adt.set(i, 0.0), p.dt.set(i, 1.0), p.trap.set(i, 0.0);
  for (int64_t i = 0; i < p.angles.numel(); ++i) p.angles.set(i, 0.0);

  // Hand evaluation of DESIGN §2.2 with alpha = 1, lambda = 1/2, dt = 1, theta = 0, psi = 1.
  const int64_t L = c.L, H = c.H, N = c.N, P = c.P, R = c.R;
  std::vector<double> want(L * H * P);
  for (int64_t h = 0; h < H; ++h) {
    std::vector<double> S(P * N, 0.0), kprev(R * N, 0.0), xprev(P, 0.0);
    for (int64_t t = 0; t < L; ++t) {
      std::vector<double> q(R * N), k(R * N);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t n = 0; n < N; ++n) {
          q[r * N + n] = p.q.get((t * R + r) * N + n) + p.q_bias.get((h * R + r) * N + n);
          k[r * N + n] = p.k.get((t * R + r) * N + n) + p.k_bias.get((h * R + r) * N + n);
        }
      for (int64_t x = 0; x < P; ++x)
        for (int64_t n = 0; n < N; ++n)
          for (int64_t r = 0; r < R; ++r)
            S[x * N + n] += 0.5 * xprev[x] * kprev[r * N + n] +
                            0.5 * p.v.get((t * H + h) * P + x) * k[r * N + n];
      for (int64_t x = 0; x < P; ++x) {
        double o = 0;
        for (int64_t r = 0; r < R; ++r) {
          double y = p.d.get(h) * p.v.get((t * H + h) * P + x);
          for (int64_t n = 0; n < N; ++n) y += S[x * N + n] * q[r * N + n];
          o += p.mimo_o.get((h * R + r) * P + x) * y;
        }
        want[(t * H + h) * P + x] = o;
      }
      kprev = k;
      for (int64_t x = 0; x < P; ++x) xprev[x] = p.v.get((t * H + h) * P + x);
    }
  }
  RunOptions o;
  o.backward = false;
  for (Eval ev : {Eval::kReference, Eval::kNaiveF32, Eval::kCpu}) {
    Result r = run(p, ev, o);
    const auto& got = r.at("out");
    ASSERT_EQ(got.size(), want.size());
    double max_abs = 0;
    for (double w : want) max_abs = std::max(max_abs, std::abs(w));
    EXPECT_GT(max_abs, 10.0) << "the plumbing case must exercise non-trivial values";
    for (size_t i = 0; i < want.size(); ++i)
      ASSERT_EQ(got[i], want[i]) << "eval " << static_cast<int>(ev) << " element " << i;
  }
}

// Splitting a sequence and feeding the prefix's final states into the rest reproduces the
// unsplit run, and chaining the two backwards reproduces the unsplit gradients.
void split_and_continue(Eval ev, int64_t R, double tol) {
  check::Problem full = small_problem(150, R, 11);
  RunOptions o;
  Result whole = run(full, ev, o);
  const int64_t cut = 67;
  const bool f64 = ev == Eval::kReference;
  const DType sdt = f64 ? DType::kF64 : DType::kF32;

  check::Problem pre = slice_tokens(full, 0, cut, full.initial);
  check::HostTensor out1 = pre.make_out(f64 ? DType::kF64 : DType::kF32);
  check::StateBuffers mid = pre.make_states();
  mid = {mid.angle.to(sdt), mid.ssm.to(sdt), mid.k.to(sdt), mid.v.to(sdt)};
  ForwardArgs f;
  f.in = pre.inputs();
  f.out = out1.view();
  f.final_states = mid.view();
  ASSERT_TRUE(run_eval(ev, f).ok());
  check::Problem post = slice_tokens(full, cut, 150, mid);
  RunOptions fwd_only = o;
  fwd_only.backward = false;
  Result second = run(post, ev, fwd_only);

  // Forward: outputs concatenate, final states match.
  std::vector<double> cat;
  auto a = out1.to_double();
  const auto& b = second.at("out");
  const int64_t row = 4 * full.config().P;  // H * P per token
  for (int64_t bb = 0; bb < 2; ++bb) {
    cat.insert(cat.end(), a.begin() + bb * cut * row, a.begin() + (bb + 1) * cut * row);
    cat.insert(cat.end(), b.begin() + bb * (150 - cut) * row, b.begin() + (bb + 1) * (150 - cut) * row);
  }
  Result got{{"out", cat}}, want{{"out", whole.at("out")}};
  for (const char* k : {"final.angle", "final.ssm", "final.k", "final.v"}) {
    got[k] = second.at(k);
    want[k] = whole.at(k);
  }
  expect_close(got, want, tol, "split forward");

  // Backward: the second part's initial-state gradients are the first part's final cotangents.
  check::HostTensor dout_full = full.random_d_out(f64 ? DType::kF64 : DType::kF32, o.cot_seed);
  check::HostTensor dout_post = dout_full.slice(1, cut, 150);
  check::StateBuffers dfin = full.random_d_states(o.cot_seed);
  check::GradBuffers g2 = post.make_grads(f64);
  BackwardArgs b2;
  b2.in = post.inputs();
  b2.d_out = dout_post.view();
  b2.d_final = dfin.view();
  b2.grads = g2.view();
  ASSERT_TRUE(run_eval(ev, b2).ok());
  check::HostTensor dout_pre = dout_full.slice(1, 0, cut);
  check::GradBuffers g1 = pre.make_grads(f64);
  BackwardArgs b1;
  b1.in = pre.inputs();
  b1.d_out = dout_pre.view();
  b1.d_final = g2.initial.view();
  b1.grads = g1.view();
  ASSERT_TRUE(run_eval(ev, b1).ok());
  Result gg, gw;
  for (auto [name, t1, t2] : {std::tuple{"grad.v", &g1.v, &g2.v}, std::tuple{"grad.q", &g1.q, &g2.q},
                              std::tuple{"grad.adt", &g1.adt, &g2.adt},
                              std::tuple{"grad.angles", &g1.angles, &g2.angles}}) {
    // Time is axis 1 for q/v/angles and axis 2 for adt; compare token ranges separately.
    const int axis = std::string(name) == "grad.adt" ? 2 : 1;
    const auto& full_v = whole.at(name);
    gg[std::string(name) + ".pre"] = t1->to_double();
    gg[std::string(name) + ".post"] = t2->to_double();
    // Build the matching slices of the unsplit gradient.
    std::vector<int64_t> shape = t1->shape();
    shape[axis] = 150;
    check::HostTensor ft(DType::kF64, shape);
    for (int64_t i = 0; i < ft.numel(); ++i) ft.set(i, full_v[i]);
    gw[std::string(name) + ".pre"] = ft.slice(axis, 0, cut).to_double();
    gw[std::string(name) + ".post"] = ft.slice(axis, cut, 150).to_double();
  }
  // Parameters: the sum of both parts.
  for (auto [name, t1, t2] :
       {std::tuple{"grad.q_bias", &g1.q_bias, &g2.q_bias}, std::tuple{"grad.d", &g1.d, &g2.d},
        std::tuple{"grad.norm_weight", &g1.norm_weight, &g2.norm_weight}}) {
    auto v1 = t1->to_double(), v2 = t2->to_double();
    for (size_t i = 0; i < v1.size(); ++i) v1[i] += v2[i];
    gg[name] = v1;
    gw[name] = whole.at(name);
  }
  for (const char* k : {"angle", "ssm", "k", "v"}) {
    const check::HostTensor* t = std::string(k) == "angle" ? &g1.initial.angle
                                 : std::string(k) == "ssm" ? &g1.initial.ssm
                                 : std::string(k) == "k"   ? &g1.initial.k
                                                           : &g1.initial.v;
    gg[std::string("grad.initial.") + k] = t->to_double();
    gw[std::string("grad.initial.") + k] = whole.at(std::string("grad.initial.") + k);
  }
  expect_close(gg, gw, tol, "split backward");
}

TEST(SplitAndContinue, ReferenceSiso) { split_and_continue(Eval::kReference, 1, 1e-12); }
TEST(SplitAndContinue, ReferenceMimo) { split_and_continue(Eval::kReference, 4, 1e-12); }
TEST(SplitAndContinue, CpuSiso) { split_and_continue(Eval::kCpu, 1, 2e-6); }
TEST(SplitAndContinue, CpuMimo) { split_and_continue(Eval::kCpu, 4, 2e-6); }

// Decode steps from the initial states reproduce the prefill token by token.
void steps_equal_prefill(Eval ev, Lane lane, int64_t R, double tol) {
  check::Problem p = small_problem(37, R, 21);
  RunOptions o;
  o.backward = false;
  Result pre = run(p, ev, o);
  const auto& c = p.config();
  const bool f64 = ev == Eval::kReference;
  check::StateBuffers st = p.initial;
  const DType sdt = f64 ? DType::kF64 : DType::kF32;
  st = {st.angle.to(sdt), st.ssm.to(sdt), st.k.to(sdt), st.v.to(sdt)};
  check::HostTensor out = p.make_out(f64 ? DType::kF64 : DType::kF32);
  for (int64_t t = 0; t < c.L; ++t) {
    StepArgs s = step_view(p, t, st.view(), out, lane);
    Status r = ev == Eval::kReference ? reference::step<double>(s) : step(s);
    ASSERT_TRUE(r.ok()) << r.ToString();
  }
  Result got{{"out", out.to_double()},
             {"final.angle", st.angle.to_double()},
             {"final.ssm", st.ssm.to_double()},
             {"final.k", st.k.to_double()},
             {"final.v", st.v.to_double()}};
  expect_close(got, pre, tol, "steps vs prefill");
}

TEST(StepsEqualPrefill, ReferenceSiso) { steps_equal_prefill(Eval::kReference, Lane::kReference, 1, 1e-12); }
TEST(StepsEqualPrefill, ReferenceMimo) { steps_equal_prefill(Eval::kReference, Lane::kReference, 4, 1e-12); }
TEST(StepsEqualPrefill, CpuSiso) { steps_equal_prefill(Eval::kCpu, Lane::kCpu, 1, 2e-6); }
TEST(StepsEqualPrefill, CpuMimo) { steps_equal_prefill(Eval::kCpu, Lane::kCpu, 4, 2e-6); }

// Central finite differences of L = sum(out * dout) + sum(final * dfinal) for sampled
// elements of every input, in float64.
TEST(FiniteDifferences, ReferenceGradientsOfEveryInput) {
  for (int64_t R : {1, 2}) {
    check::ProblemConfig c = check::default_config(1, 11, 2, 1, 6, 4, R, 31 + R);
    c.NA = 2;
    c.has_states = true;
    c.has_norm = true;
    c.seqlens = {4, 0, 7};
    check::Problem p = check::Problem(c).as_f64();
    check::HostTensor dout = p.random_d_out(DType::kF64, 5);
    check::StateBuffers ds = p.random_d_states(5);
    auto loss = [&](const check::Problem& pp) {
      check::HostTensor out = pp.make_out(DType::kF64);
      check::StateBuffers fs = pp.make_states();
      fs = {fs.angle.to(DType::kF64), fs.ssm.to(DType::kF64), fs.k.to(DType::kF64),
            fs.v.to(DType::kF64)};
      ForwardArgs f;
      f.in = pp.inputs();
      f.out = out.view();
      f.final_states = fs.view();
      EXPECT_TRUE(reference::forward<double>(f).ok());
      double l = 0;
      for (int64_t i = 0; i < out.numel(); ++i) l += out.get(i) * dout.get(i);
      for (auto [a, b] : {std::pair{&fs.ssm, &ds.ssm}, std::pair{&fs.k, &ds.k},
                          std::pair{&fs.v, &ds.v}, std::pair{&fs.angle, &ds.angle}})
        for (int64_t i = 0; i < a->numel(); ++i) l += a->get(i) * b->get(i);
      return l;
    };
    check::GradBuffers g = p.make_grads(true);
    BackwardArgs b;
    b.in = p.inputs();
    b.d_out = dout.view();
    b.d_final = ds.view();
    b.grads = g.view();
    ASSERT_TRUE(reference::backward<double>(b).ok());
    int checked = 0;
    auto check_input = [&](const char* name, check::HostTensor check::Problem::*member,
                           const check::HostTensor& grad) {
      ASSERT_TRUE(grad.defined()) << name;
      const int64_t n = grad.numel();
      for (int64_t j = 0; j < 6; ++j) {
        const int64_t i = (j * 7919 + 13) % n;
        check::Problem pp = p, pm = p;
        const double x = (p.*member).get(i), eps = 1e-6 * std::max(1.0, std::abs(x));
        (pp.*member).set(i, x + eps);
        (pm.*member).set(i, x - eps);
        const double fd = (loss(pp) - loss(pm)) / (2 * eps);
        EXPECT_NEAR(grad.get(i), fd, 1e-6 * std::max(1.0, std::abs(fd)))
            << name << "[" << i << "] R=" << R;
        ++checked;
      }
    };
    using Pb = check::Problem;
    check_input("q", &Pb::q, g.q), check_input("k", &Pb::k, g.k), check_input("v", &Pb::v, g.v);
    check_input("adt", &Pb::adt, g.adt), check_input("dt", &Pb::dt, g.dt);
    check_input("trap", &Pb::trap, g.trap), check_input("q_bias", &Pb::q_bias, g.q_bias);
    check_input("k_bias", &Pb::k_bias, g.k_bias), check_input("angles", &Pb::angles, g.angles);
    check_input("d", &Pb::d, g.d), check_input("z", &Pb::z, g.z);
    check_input("norm_weight", &Pb::norm_weight, g.norm_weight);
    if (R > 1) {
      check_input("mimo_v", &Pb::mimo_v, g.mimo_v), check_input("mimo_z", &Pb::mimo_z, g.mimo_z);
      check_input("mimo_o", &Pb::mimo_o, g.mimo_o);
    }
    // Initial states (members of the StateBuffers member).
    for (auto [name, sel] :
         {std::pair{"initial.angle", 0}, std::pair{"initial.ssm", 1}, std::pair{"initial.k", 2},
          std::pair{"initial.v", 3}}) {
      auto pick = [sel](check::StateBuffers& s) -> check::HostTensor& {
        return sel == 0 ? s.angle : sel == 1 ? s.ssm : sel == 2 ? s.k : s.v;
      };
      const check::HostTensor& grad = pick(g.initial);
      for (int64_t j = 0; j < 6; ++j) {
        const int64_t i = (j * 7919 + 13) % grad.numel();
        check::Problem pp = p, pm = p;
        const double x = pick(p.initial).get(i), eps = 1e-6;
        pick(pp.initial).set(i, x + eps);
        pick(pm.initial).set(i, x - eps);
        const double fd = (loss(pp) - loss(pm)) / (2 * eps);
        EXPECT_NEAR(grad.get(i), fd, 1e-6 * std::max(1.0, std::abs(fd))) << name << "[" << i << "]";
        ++checked;
      }
    }
    EXPECT_GE(checked, 90);
  }
}

}  // namespace
}  // namespace mamba3::test
