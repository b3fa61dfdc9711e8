// The cuda lane's backward kernels run on the CPU through tests/emu/emu.h (one host thread per
// CUDA thread), against the float64 reference with the tolerance recipe, on small shapes. For
// developing the kernels without a GPU; the GPU tests (tests/cuda/test_cuda_backward.cpp) are the
// real check. Built with -DMAMBA3_BUILD_EMU_TESTS=ON in a CPU-only build (-DMAMBA3_ENABLE_CUDA=OFF).
#define MAMBA3_CUDA_EMU 1
#include "emu.h"
// clang-format off
#include "cuda/chunk_bwd/bwd_launch.cuh"
// clang-format on

#include <gtest/gtest.h>

#include "test_util.h"

namespace mamba3::test {
namespace {

// Gradients of the emulated cuda backward, named as run() names them; *tc (if given) says
// whether the tensor-core chunk kernels ran.
Result run_emu(const check::Problem& p, const RunOptions& o, bool* tc = nullptr) {
  Result r;
  const DType odt = o.out_dtype;
  check::HostTensor dout = p.random_d_out(odt, o.cot_seed);
  check::StateBuffers ds = p.random_d_states(o.cot_seed);
  check::GradBuffers g = p.make_grads(false);
  BackwardArgs b;
  b.in = p.inputs();
  b.d_out = dout.view();
  b.d_final = ds.view();
  b.grads = g.view();
  b.lane = Lane::kCpu;  // validation of host tensors; the kernels run emulated
  Dims d;
  Status st = validate_backward(b, &d);
  EXPECT_TRUE(st.ok()) << st.ToString();
  if (tc) *tc = cuda::bwd::backward_uses_tensor_cores(b, d);
  st = cuda::bwd::backward_chunked(b, d);
  EXPECT_TRUE(st.ok()) << st.ToString();
  put_grads(&r, g);
  return r;
}

Result grads_only(const Result& r) {
  Result o;
  for (const auto& [name, v] : r)
    if (name.rfind("grad.", 0) == 0) o[name] = v;
  return o;
}

class EmuBackward : public testing::TestWithParam<Case> {};

TEST_P(EmuBackward, WithinRecipe) {
  const Case& c = GetParam();
  check::Problem p = make(c, 900 + c.L);
  RunOptions o;
  o.out_dtype = c.dtype;
  const Result ref = grads_only(run(p, Eval::kReference, o));
  const Result naive = grads_only(run(p, Eval::kNaiveF32, o));
  const Result got = run_emu(p, o);
  expect_within_recipe(got, ref, naive, p.config().describe());
  if (std::getenv("MAMBA3_EMU_DETERMINISM"))
    expect_bitwise_equal(got, run_emu(p, o), "two emulated runs");
}

INSTANTIATE_TEST_SUITE_P(
    Small, EmuBackward,
    testing::Values(
        Case{"siso_L70", 2, 70, 2, 1, 16, 8, 1, 4, true, false, false, {}, kI, kF},
        Case{"siso_gqa_norm", 1, 67, 4, 2, 16, 12, 1, 8, true, true, false, {}, kH, kF},
        Case{"mimo_r2_norm", 1, 45, 4, 2, 16, 8, 2, 4, true, true, true, {}, kH, kF},
        Case{"mimo_r4_per_rank", 1, 21, 2, 1, 8, 8, 4, 2, true, false, false, {}, kI, kF},
        Case{"mimo_r8", 1, 11, 2, 1, 16, 8, 8, 8, true, false, true, {}, kH, kF},
        Case{"mimo_r8_13_chunks", 2, 100, 2, 1, 16, 8, 8, 4, true, true, true, {}, kI, kF},
        Case{"varlen", 1, 110, 2, 1, 16, 8, 1, 4, true, false, false, {30, 0, 1, 64, 15}, kI, kF},
        Case{"L0", 2, 0, 2, 1, 16, 8, 1, 4, true, false, false, {}, kI, kF},
        Case{"L1_nostates", 2, 1, 2, 1, 16, 8, 1, 4, false, false, false, {}, kI, kF},
        Case{"bf16_mimo", 1, 40, 2, 1, 16, 8, 2, 4, true, true, true, {}, kH, kB},
        Case{"p48_tiles", 1, 130, 2, 1, 32, 48, 1, 8, true, true, false, {}, kI, kF},
        Case{"n128_p128_r2", 1, 40, 2, 1, 128, 128, 2, 64, true, false, true, {}, kH, kF}),
    [](const testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

// The tensor-core chunk kernels (bf16 q, k, v at N, P in {64, 128}): bf16 operands inside the
// chunk (DESIGN §2.6) that a token-by-token naive evaluation cannot mirror, so the recipe does
// not apply; issue 5's bar for the bf16 tensor-core backward is a relative L2 error <= 1e-2
// against float64 for every gradient (the GPU tests use the same bound, kTcGradTol there).
constexpr double kTcGradTol = 1e-2;

class EmuBackwardTc : public testing::TestWithParam<Case> {};

TEST_P(EmuBackwardTc, WithinBf16Bar) {
  const Case& c = GetParam();
  check::Problem p = make(c, 900 + c.L);
  RunOptions o;
  o.out_dtype = c.dtype;
  const Result ref = grads_only(run(p, Eval::kReference, o));
  bool tc = false;
  const Result got = run_emu(p, o, &tc);
  ASSERT_TRUE(tc) << "the tensor-core kernels did not run";
  for (const auto& [name, v] : ref) {
    const check::Metric m = check::compare(name, got.at(name), v, kTcGradTol, false);
    std::printf("  %-22s rel_l2 %.3e\n", name.c_str(), m.rel_l2);
  }
  expect_close(got, ref, kTcGradTol, p.config().describe() + " (tensor cores)");
  if (std::getenv("MAMBA3_EMU_DETERMINISM"))
    expect_bitwise_equal(got, run_emu(p, o), "two emulated tensor-core runs");
}

INSTANTIATE_TEST_SUITE_P(
    Bf16, EmuBackwardTc,
    testing::Values(
        Case{"tc_siso", 1, 100, 2, 1, 64, 64, 1, 16, true, false, false, {}, kI, kB},
        Case{"tc_siso_halved_n128_norm", 1, 70, 2, 1, 128, 64, 1, 32, true, true, false, {}, kH, kB},
        Case{"tc_mimo_r2_gqa", 1, 50, 4, 2, 64, 64, 2, 16, true, true, true, {}, kH, kB},
        Case{"tc_mimo_r4_p128", 1, 40, 2, 1, 64, 128, 4, 32, true, false, true, {}, kI, kB},
        Case{"tc_varlen", 1, 110, 2, 1, 64, 64, 1, 16, true, false, false, {30, 0, 1, 64, 15}, kI, kB},
        // N = P = 128: the SIMT chunk layouts need 32-row chunks, so the tensor-core kernels run
        // two 16-row tiles per chunk.
        Case{"tc_n128_p128_rows32", 1, 70, 1, 1, 128, 128, 1, 64, true, true, false, {}, kI, kB},
        Case{"tc_mimo_r8_per_rank", 1, 20, 2, 1, 64, 64, 8, 16, false, false, false, {}, kH, kB}),
    [](const testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

}  // namespace
}  // namespace mamba3::test
