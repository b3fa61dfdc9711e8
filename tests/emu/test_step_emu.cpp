// The cuda lane's decode-step kernels run on the CPU through tests/emu/emu.h (one host thread per
// CUDA thread, AddressSanitizer): L single steps against the float64 prefill of the same L
// tokens with the tolerance recipe, on the persistent kernel (with fewer CTAs than (batch, head)
// items, so its grid-stride loop and prefetch run), the previous fast kernel and the general
// one. The persistent and fast kernels do the same arithmetic per element, so their results
// must agree bitwise. For developing the kernels without a GPU; tests/cuda/test_cuda_lane.cpp
// (CudaStep.*) is the real check.
#define MAMBA3_CUDA_EMU 1
#include "emu.h"
// clang-format off
#include "cuda/step/step_launch.cuh"
// clang-format on

#include <gtest/gtest.h>

#include <cmath>

#include "core/step_view.h"
#include "test_util.h"

namespace mamba3::test {
namespace {

struct StepCase {
  const char* name;
  int64_t B, H, G, N, P, R;
  DType dtype;
  RopePairing pairing;
  bool z, d, norm, mimo_o;
  const char* threads;  // MAMBA3_CUDA_STEP_THREADS
  const char* ctas;     // MAMBA3_CUDA_STEP_CTAS (persistent grid); null: the default
};

constexpr int64_t kSteps = 3;

check::Problem make_step_problem(const StepCase& c) {
  check::ProblemConfig cfg = check::default_config(c.B, kSteps, c.H, c.G, c.N, c.P, c.R,
                                                   1000 + c.N + c.P + c.R);
  cfg.NA = c.N / 4;
  cfg.has_states = true;
  cfg.has_z = c.z;
  cfg.has_d = c.d;
  cfg.has_norm = c.norm;
  cfg.has_mimo_o = c.R > 1 && c.mimo_o;
  cfg.rope_pairing = c.pairing;
  cfg.dtype = c.dtype;
  return check::Problem(cfg);
}

// kSteps emulated decode steps of `p` (states updated in place, one output token per step);
// `which` gets the kernel of the last step (2 persistent, 1 fast, 0 general).
Result run_emu_steps(const check::Problem& p, int* which) {
  check::StateBuffers st = p.initial;
  check::HostTensor out = p.make_out(DType::kF32);
  for (int64_t t = 0; t < p.config().L; ++t) {
    // Lane::kCpu: validation of host tensors; the kernels run emulated.
    const StepArgs s = step_view(p, t, st.view(), out, Lane::kCpu);
    Dims d, fd;
    Status r = validate_step(s, &d);
    EXPECT_TRUE(r.ok()) << r.ToString();
    const ForwardArgs f = step_as_forward(s);
    r = validate_forward(f, &fd);
    EXPECT_TRUE(r.ok()) << r.ToString();
    const cuda::CoreParams cp = cuda::make_params(f, fd);
    cuda::StepPersistParams sp{};
    r = cuda::decode::step_kernel_choice(s, d, cp, which, &sp);
    EXPECT_TRUE(r.ok()) << r.ToString();
    r = cuda::decode::launch_step(s, d, cp, nullptr);
    EXPECT_TRUE(r.ok()) << r.ToString();
  }
  Result got{{"out", out.to_double()}};
  put_states(&got, st);
  return got;
}

double l2(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

class EmuStep : public testing::TestWithParam<StepCase> {};

// Persistent kernel within the recipe of the float64 prefill, and bitwise equal to the fast
// kernel (MAMBA3_CUDA_STEP_PERSISTENT=0) on the same steps.
TEST_P(EmuStep, PersistentWithinRecipeAndEqualsFast) {
  const StepCase& c = GetParam();
  const check::Problem p = make_step_problem(c);
  RunOptions o;
  o.backward = false;
  const Result pre = run(p, Eval::kReference, o);
  const Result naive = run(p, Eval::kNaiveF32, o);
  ScopedEnv threads("MAMBA3_CUDA_STEP_THREADS", c.threads);
  ScopedEnv ctas("MAMBA3_CUDA_STEP_CTAS", c.ctas);
  int which = -1;
  Result got;
  {
    ScopedEnv on("MAMBA3_CUDA_STEP_PERSISTENT", "1");
    got = run_emu_steps(p, &which);
  }
  EXPECT_EQ(which, 2) << "the persistent kernel did not run";
  // Never on zeros: the output and every state carry signal.
  for (const auto& [name, v] : got) EXPECT_GT(l2(v), 1e-3) << name;
  for (const auto& [name, v] : pre) {
    const double e = check::compare(name, got.at(name), v, 1, name == "final.angle").rel_l2;
    const double en = check::compare(name, naive.at(name), v, 1, name == "final.angle").rel_l2;
    std::printf("  %-12s rel_l2 %.3e  (naive f32 %.3e)\n", name.c_str(), e, en);
  }
  expect_within_recipe(got, pre, naive, p.config().describe() + " (persistent)");
  int which_fast = -1;
  Result fast;
  {
    ScopedEnv off("MAMBA3_CUDA_STEP_PERSISTENT", "0");
    fast = run_emu_steps(p, &which_fast);
  }
  EXPECT_EQ(which_fast, 1) << "the fast kernel did not run";
  expect_within_recipe(fast, pre, naive, p.config().describe() + " (fast)");
  expect_bitwise_equal(got, fast, "persistent vs fast kernel");
}

// ctas "3": fewer CTAs than (batch, head) items, so every CTA walks several items and prefetches.
INSTANTIATE_TEST_SUITE_P(
    Steps, EmuStep,
    testing::Values(
        StepCase{"r1_n128_p64_bf16", 3, 4, 1, 128, 64, 1, kB, kI, true, true, false, false, "128", "3"},
        StepCase{"r1_n128_p64_bf16_t256", 3, 4, 1, 128, 64, 1, kB, kI, true, true, false, false, "256", "5"},
        StepCase{"r1_n64_p128_f32_halved_noz_nod", 2, 4, 2, 64, 128, 1, kF, kH, false, false, false, false, "256", "3"},
        StepCase{"r1_n64_p64_bf16_gqa_norm", 2, 6, 3, 64, 64, 1, kB, kH, true, false, true, false, "128", "4"},
        StepCase{"r4_n128_p64_bf16", 2, 4, 1, 128, 64, 4, kB, kH, true, true, true, true, "256", "3"},
        StepCase{"r4_n64_p128_f32_per_rank", 2, 2, 1, 64, 128, 4, kF, kI, true, true, false, false, "256", "3"},
        StepCase{"r4_n128_p128_f32_gqa_noz", 1, 4, 2, 128, 128, 4, kF, kI, false, true, true, true, "128", "3"},
        StepCase{"r2_n64_p64_f16", 2, 2, 1, 64, 64, 2, kF16, kH, true, true, false, true, "256", "3"},
        StepCase{"r8_n64_p64_bf16", 1, 3, 1, 64, 64, 8, kB, kI, true, true, true, true, "256", "2"},
        StepCase{"r1_default_grid", 2, 2, 1, 128, 64, 1, kB, kI, true, true, false, false, nullptr, nullptr}),
    [](const testing::TestParamInfo<StepCase>& i) { return std::string(i.param.name); });

// The general kernel (N = 32: no float4 fast path) within the recipe too.
TEST(EmuStepGeneral, WithinRecipe) {
  const StepCase c{"general_n32", 2, 2, 1, 32, 16, 2, kB, kH, true, true, true, false, nullptr, nullptr};
  const check::Problem p = make_step_problem(c);
  RunOptions o;
  o.backward = false;
  const Result pre = run(p, Eval::kReference, o);
  const Result naive = run(p, Eval::kNaiveF32, o);
  int which = -1;
  const Result got = run_emu_steps(p, &which);
  EXPECT_EQ(which, 0);
  expect_within_recipe(got, pre, naive, p.config().describe() + " (general)");
}

// Mixed dtypes (q bf16, v fp32) take the fast kernel; MAMBA3_CUDA_STEP_PERSISTENT=1 then fails
// naming the gate, and bad values of the step variables are errors naming them.
TEST(EmuStepGates, FallbackAndErrors) {
  const StepCase c{"gates", 2, 2, 1, 64, 64, 1, kB, kI, true, true, false, false, nullptr, nullptr};
  const check::Problem p = make_step_problem(c);
  check::StateBuffers st = p.initial;
  check::HostTensor out = p.make_out(DType::kF32);
  const check::HostTensor v32 = p.v.to(DType::kF32);
  // A step, its dims and device views.
  struct Call {
    StepArgs s;
    Dims d, fd;
    cuda::CoreParams cp;
  };
  auto prepare = [&](bool mixed) {
    Call k;
    k.s = step_view(p, 0, st.view(), out, Lane::kCpu);
    if (mixed) k.s.v = index_view(v32, 1, 0);
    EXPECT_TRUE(validate_step(k.s, &k.d).ok());
    const ForwardArgs f = step_as_forward(k.s);
    EXPECT_TRUE(validate_forward(f, &k.fd).ok());
    k.cp = cuda::make_params(f, k.fd);
    return k;
  };
  const Call mixed = prepare(true), same = prepare(false);
  cuda::StepPersistParams sp{};
  int which = -1;
  {
    ScopedEnv unset("MAMBA3_CUDA_STEP_PERSISTENT", nullptr);
    ASSERT_TRUE(cuda::decode::step_kernel_choice(mixed.s, mixed.d, mixed.cp, &which, &sp).ok());
    EXPECT_EQ(which, 1);
    ASSERT_TRUE(cuda::decode::step_kernel_choice(same.s, same.d, same.cp, &which, &sp).ok());
    EXPECT_EQ(which, 2);
  }
  {
    ScopedEnv on("MAMBA3_CUDA_STEP_PERSISTENT", "1");
    const Status r = cuda::decode::step_kernel_choice(mixed.s, mixed.d, mixed.cp, &which, &sp);
    EXPECT_EQ(r.code(), StatusCode::kNotSupported) << r.ToString();
    EXPECT_NE(r.message().find("MAMBA3_CUDA_STEP_PERSISTENT"), std::string::npos);
  }
  for (auto [name, bad] : {std::pair{"MAMBA3_CUDA_STEP_PERSISTENT", "yes"},
                           std::pair{"MAMBA3_CUDA_STEP_CTAS", "0"},
                           std::pair{"MAMBA3_CUDA_STEP_CTAS", "4x"},
                           std::pair{"MAMBA3_CUDA_STEP_THREADS", "96"}}) {
    ScopedEnv env(name, bad);
    const Status r = cuda::decode::launch_step(same.s, same.d, same.cp, nullptr);
    EXPECT_EQ(r.code(), StatusCode::kInvalidArgument) << name << "=" << bad << ": " << r.ToString();
    EXPECT_NE(r.message().find(name), std::string::npos) << r.message();
  }
}

}  // namespace
}  // namespace mamba3::test
