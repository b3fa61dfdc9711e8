// The cuda lane's backward on a GPU: golden gradients, the random-problem matrix against the
// float64 reference (tolerance recipe, gradients only: the forward has its own tests), bitwise
// determinism, the saved-activation buffer (training mode) and its gate, capture in a CUDA graph and the errors of
// unsupported configurations. Every test skips cleanly without a device.
#include <cstdio>

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "check/golden.h"
#include "cuda/common/staging.cuh"
#include "test_util.h"

namespace mamba3::test {
namespace {

TEST(CudaBackwardGolden, GradientsWithinRecipe) {
  REQUIRE_GPU();
  for (const char* f : {"golden_public_siso.safetensors", "golden_public_mimo.safetensors"}) {
    std::vector<check::CaseReport> reports;
    Status st = check::run_golden_file(golden_path(f), Lane::kCuda, &reports, /*forward_only=*/false);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ASSERT_FALSE(reports.empty());
    for (const auto& r : reports) {
      EXPECT_TRUE(r.status.ok()) << r.case_name << ": " << r.status.ToString();
      int grads = 0;
      for (const auto& m : r.metrics) {
        grads += m.name.rfind("grad.", 0) == 0;
        EXPECT_TRUE(m.pass) << r.case_name << "\n" << check::format_metric(m);
      }
      EXPECT_GE(grads, 10) << r.case_name << ": gradients were not checked";
    }
  }
}

// The tensor-core backward (bf16 q, k, v at N, P in {64, 128}; src/cuda/chunk_bwd/bwd_tc.cuh)
// rounds its chunk operands to bf16 (DESIGN §2.6) where a token-by-token naive float32
// evaluation cannot mirror it, so the recipe does not apply there: issue 5's bar, kTcGradTol
// (test_util.h; the forward's equivalent is kTcForwardTol on out and the ssm state). The CPU
// emulation of these kernels measures at most ~5e-3 (tests/emu). A gradient so ill-conditioned
// that naive float32 itself misses the bar (grad.d under the output norm) is held to the recipe
// instead (expect_within_bar_or_recipe).

// MIMO takes the tensor cores unless MAMBA3_CUDA_BWD_MIMO_TC=0 (bwd_launch.cuh): bf16 MIMO cases
// named *tc* run the default (tensor cores); bf16_mimo opts out, so the fp32 SIMT kernels stay
// tested on bf16 MIMO.
bool opts_out_of_mimo_tc(const Case& c) {
  return c.R > 1 && std::string(c.name).find("tc") == std::string::npos;
}

bool tensor_core_case(const Case& c) {
  return c.dtype == DType::kBF16 && (c.N == 64 || c.N == 128) && (c.P == 64 || c.P == 128) &&
         !opts_out_of_mimo_tc(c);
}

class CudaBackwardVsReference : public testing::TestWithParam<Case> {};

TEST_P(CudaBackwardVsReference, GradientsWithinRecipe) {
  REQUIRE_GPU();
  const Case& c = GetParam();
  check::Problem p = make(c, 700 + c.L);
  RunOptions o;
  o.out_dtype = c.dtype;
  const Result ref = grads_only(run(p, Eval::kReference, o));
  const Result naive = grads_only(run(p, Eval::kNaiveF32, o));
  ScopedEnv mimo_tc("MAMBA3_CUDA_BWD_MIMO_TC", opts_out_of_mimo_tc(c) ? "0" : nullptr);
  const Result got = grads_only(run(p, Eval::kCuda, o));
  if (tensor_core_case(c))
    expect_within_bar_or_recipe(got, ref, naive, kTcGradTol,
                                p.config().describe() + " (tensor cores)");
  else
    expect_within_recipe(got, ref, naive, p.config().describe());
}

INSTANTIATE_TEST_SUITE_P(
    Matrix, CudaBackwardVsReference,
    testing::Values(
        Case{"siso_L1", 2, 1, 2, 1, 64, 64, 1, 16, true, false, false, {}, kI, kF},
        Case{"siso_L0", 2, 0, 2, 1, 64, 64, 1, 16, true, false, false, {}, kI, kF},
        Case{"siso_L63", 1, 63, 2, 1, 64, 32, 1, 16, true, false, false, {}, kI, kF},
        Case{"siso_L64_nostates", 1, 64, 4, 2, 128, 64, 1, 32, false, false, false, {}, kI, kF},
        Case{"siso_L65_norm", 2, 65, 4, 2, 128, 64, 1, 64, true, true, false, {}, kI, kF},
        Case{"siso_L331_halved", 1, 331, 2, 1, 64, 64, 1, 32, true, false, false, {}, kH, kF},
        Case{"siso_N128_P128", 1, 200, 2, 1, 128, 128, 1, 64, true, true, false, {}, kI, kF},
        Case{"siso_odd_P", 1, 97, 2, 1, 32, 40, 1, 8, true, true, false, {}, kH, kF},
        Case{"mimo_r2", 1, 67, 2, 1, 64, 64, 2, 16, true, false, true, {}, kH, kF},
        Case{"mimo_r4_gqa_norm", 2, 130, 4, 2, 128, 64, 4, 32, true, true, true, {}, kH, kF},
        Case{"mimo_r4_per_rank", 1, 45, 2, 1, 64, 32, 4, 16, false, false, false, {}, kI, kF},
        Case{"mimo_r8", 1, 33, 2, 1, 64, 64, 8, 32, true, false, true, {}, kH, kF},
        Case{"mimo_r8_N128_P128", 1, 40, 2, 1, 128, 128, 8, 64, true, true, true, {}, kI, kF},
        Case{"varlen", 1, 150, 2, 1, 64, 64, 1, 16, true, false, false, {70, 0, 1, 64, 15}, kI, kF},
        Case{"varlen_mimo", 1, 200, 4, 2, 64, 64, 2, 16, true, true, true, {80, 0, 63, 57}, kI, kF},
        Case{"bf16_siso", 2, 300, 4, 1, 128, 64, 1, 32, true, false, false, {}, kI, kB},
        Case{"bf16_mimo", 1, 200, 4, 1, 128, 64, 4, 32, true, true, true, {}, kH, kB},
        Case{"fp16_siso", 1, 150, 2, 1, 64, 64, 1, 16, true, true, false, {}, kI, kF16},
        // Tensor-core backward (bf16, N and P in {64, 128}).
        Case{"tc_siso_n64_halved", 1, 200, 2, 1, 64, 64, 1, 16, true, false, false, {}, kH, kB},
        Case{"tc_n128_p128_norm", 1, 150, 2, 1, 128, 128, 1, 64, true, true, false, {}, kI, kB},
        Case{"tc_mimo_r2_n64_p128", 1, 130, 2, 1, 64, 128, 2, 32, true, false, true, {}, kI, kB},
        Case{"tc_mimo_r8", 1, 40, 2, 1, 64, 64, 8, 32, true, true, true, {}, kH, kB},
        Case{"tc_mimo_r4_per_rank", 1, 45, 2, 1, 128, 64, 4, 16, false, false, false, {}, kI, kB},
        Case{"tc_varlen", 1, 200, 4, 2, 128, 64, 1, 32, true, true, false, {80, 0, 63, 57}, kI, kB},
        // chunk_grad_tc is instantiated per (N, P, R); the cases above reach 6 of the 16, these
        // the other 10 (megacpp's (64, 64, 4) first; the P = 128 ones run one CTA per SM).
        Case{"tc_mimo_r4_n64_gqa_norm", 1, 90, 4, 2, 64, 64, 4, 16, true, true, true, {}, kH, kB},
        Case{"tc_mimo_r2_n64", 1, 70, 2, 1, 64, 64, 2, 32, true, false, true, {}, kI, kB},
        Case{"tc_siso_n64_p128", 1, 150, 2, 1, 64, 128, 1, 32, true, true, false, {}, kH, kB},
        Case{"tc_mimo_r4_n64_p128", 1, 50, 2, 1, 64, 128, 4, 16, true, false, true, {}, kI, kB},
        Case{"tc_mimo_r8_n64_p128", 1, 30, 2, 1, 64, 128, 8, 32, false, false, true, {}, kH, kB},
        Case{"tc_mimo_r2_n128", 1, 70, 2, 1, 128, 64, 2, 64, true, false, true, {}, kH, kB},
        Case{"tc_mimo_r8_n128", 1, 30, 2, 1, 128, 64, 8, 32, true, true, true, {}, kI, kB},
        Case{"tc_mimo_r2_n128_p128", 1, 70, 2, 1, 128, 128, 2, 32, true, false, false, {}, kI, kB},
        Case{"tc_mimo_r4_n128_p128", 1, 50, 2, 1, 128, 128, 4, 64, true, true, true, {}, kH, kB},
        Case{"tc_mimo_r8_n128_p128", 1, 30, 2, 1, 128, 128, 8, 32, true, false, true, {}, kI, kB}),
    [](const testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

// Issue 5: the MIMO angle gradient on the tensor cores over a long sequence, as the peers parity
// case (B=2 L=512 H=8 N=128 P=64 R=4, halved pairing, states, mimo projections, bf16) with a loss
// on out only: no final-state cotangents, so the true angle carry is the cancelling sum of later
// tokens' rotation gradients (H200: 1.7e-2 before bwd_angle_boundary_kernel and the split states
// of chunk_grad; emulated at B=1 H=1: 1.8e-2 -> 3.7e-3, tests/emu). Held to 5e-3 on
// grad.angles, kTcGradTol elsewhere.
TEST(CudaBackward, TcMimoAngleGradientLongSequence) {
  REQUIRE_GPU();
  const Case c{"tc_mimo_angles_L512", 2, 512, 8, 1, 128, 64, 4, 32, true, false, true, {}, kH, kB};
  check::Problem p = make(c, 700 + c.L);
  RunOptions o;
  o.out_dtype = c.dtype;
  o.d_final = false;
  const Result ref = grads_only(run(p, Eval::kReference, o));
  ScopedEnv mimo_tc("MAMBA3_CUDA_BWD_MIMO_TC", opts_out_of_mimo_tc(c) ? "0" : nullptr);
  const Result got = grads_only(run(p, Eval::kCuda, o));
  for (const auto& [name, v] : ref) {
    const double e = check::compare(name, got.at(name), v, kTcGradTol, false).rel_l2;
    std::printf("  %-22s rel_l2 %.3e\n", name.c_str(), e);
    EXPECT_LE(e, name == "grad.angles" ? 5e-3 : kTcGradTol) << name;
  }
}

TEST(CudaBackward, BitwiseDeterministic) {
  REQUIRE_GPU();
  // GQA (shared q/k over 4 heads), parameters over 2 sequences and many chunks; det_siso and
  // det_tc_mimo run the tensor-core kernels (det_mimo is fp32: SIMT).
  for (const Case& c : {Case{"det_mimo", 2, 300, 8, 2, 128, 64, 4, 32, true, true, true, {}, kH, kF},
                        Case{"det_siso", 1, 700, 8, 1, 128, 64, 1, 32, true, true, false,
                             {100, 0, 333, 267}, kI, kB},
                        Case{"det_tc_mimo", 2, 300, 8, 2, 128, 64, 4, 32, true, true, true, {}, kH,
                             kB}}) {
    check::Problem p = make(c, 8);
    RunOptions o;
    o.out_dtype = c.dtype;
    ScopedEnv mimo_tc("MAMBA3_CUDA_BWD_MIMO_TC", opts_out_of_mimo_tc(c) ? "0" : nullptr);
    expect_bitwise_equal(grads_only(run(p, Eval::kCuda, o)), grads_only(run(p, Eval::kCuda, o)),
                         std::string("two cuda backward runs, ") + c.name);
  }
}

// A case run under MAMBA3_CUDA_SEG_LEN = seg_len (null: unset, the lane's own split).
struct SegCase {
  Case c;
  const char* seg_len;
};

Result collect(const check::GradBuffers& g) {
  Result r;
  put_grads(&r, g);
  return r;
}

// Training mode on the tensor-core path (cuda/common/tile_record.cuh): the forward writes the
// tile records, chunk-start states and decays into ForwardArgs::saved and the backward reads
// them instead of running its loader pass and state scan. Per case: saving does not change a
// bit of the forward's outputs; the gradients from the saved buffer meet the same bar against
// float64 as the recomputing backward's (kTcGradTol, or the recipe where naive float32 misses
// it) and are bitwise reproducible. Covers SISO and MIMO, both
// pairings, GQA with the norm, per-rank output, packed sequences, P = 128, and the forward's
// sequence split (MAMBA3_CUDA_SEG_LEN=64: records written by its second pass).
TEST(CudaBackward, SavedTilesTrainingMode) {
  REQUIRE_GPU();
  for (const SegCase& sc :
       {SegCase{{"saved_siso", 2, 300, 4, 1, 128, 64, 1, 32, true, false, false, {}, kI, kB},
                nullptr},
        SegCase{{"saved_siso_halved_norm", 1, 200, 2, 1, 64, 64, 1, 16, true, true, false, {},
                 kH, kB},
                nullptr},
        SegCase{{"saved_mimo_gqa_norm", 2, 130, 4, 2, 128, 64, 4, 32, true, true, true, {}, kH,
                 kB},
                nullptr},
        SegCase{{"saved_mimo_r4_n64", 1, 90, 4, 2, 64, 64, 4, 16, true, true, true, {}, kI, kB},
                nullptr},
        SegCase{{"saved_per_rank", 1, 45, 2, 1, 128, 64, 4, 16, false, false, false, {}, kI, kB},
                nullptr},
        SegCase{{"saved_varlen", 1, 200, 4, 2, 128, 64, 1, 32, true, true, false,
                 {80, 0, 63, 57}, kI, kB},
                nullptr},
        SegCase{{"saved_p128_r2", 1, 130, 2, 1, 64, 128, 2, 32, true, false, true, {}, kI, kB},
                nullptr},
        SegCase{{"saved_split", 1, 333, 2, 1, 128, 64, 1, 32, true, true, false, {}, kH, kB},
                "64"},
        SegCase{{"saved_split_mimo_varlen", 1, 300, 2, 1, 64, 64, 2, 16, true, false, true,
                 {100, 0, 137, 63}, kI, kB},
                "128"}}) {
    const Case& c = sc.c;
    SCOPED_TRACE(c.name);
    ScopedEnv seg("MAMBA3_CUDA_SEG_LEN", sc.seg_len);
    check::Problem p = make(c, 900 + c.L);
    RunOptions o;
    o.out_dtype = c.dtype;
    {
      check::HostTensor out = p.make_out(c.dtype);
      int64_t n = 0;
      const Status st = cuda::saved_numel_staged(forward_args(p, out, Lane::kCuda), &n);
      ASSERT_TRUE(st.ok()) << st.ToString();
      ASSERT_GT(n, 0) << "the tensor-core path should save";
    }
    const Result plain = run(p, Eval::kCuda, o);
    o.use_saved = true;
    const Result saved = run(p, Eval::kCuda, o);
    const Result again = run(p, Eval::kCuda, o);
    Result fwd_plain, fwd_saved;
    for (const auto& [name, v] : plain)
      if (name.rfind("grad.", 0) != 0) fwd_plain[name] = v, fwd_saved[name] = saved.at(name);
    expect_bitwise_equal(fwd_saved, fwd_plain, "forward outputs with and without saving");
    expect_bitwise_equal(again, saved, "two saved-mode runs");
    o.use_saved = false;
    const Result ref = grads_only(run(p, Eval::kReference, o));
    const Result naive = grads_only(run(p, Eval::kNaiveF32, o));
    expect_within_bar_or_recipe(grads_only(saved), ref, naive, kTcGradTol,
                                p.config().describe() + " (saved tiles)");
  }
}

// MAMBA3_CUDA_SAVE_Y=0 leaves y out of the saved buffer (R P fp32 fewer per 64-row cell), and the
// backward's chunk_out recomputes y from the record and the start state: its gradients meet the
// same bar as with y (the default, SavedTilesTrainingMode) and are bitwise reproducible. Another
// value is an error naming the gate.
TEST(CudaBackward, SaveYGate) {
  REQUIRE_GPU();
  for (const Case& c :
       {Case{"no_y_siso", 1, 200, 4, 1, 128, 64, 1, 32, true, true, false, {}, kH, kB},
        Case{"no_y_mimo_gqa", 2, 100, 4, 2, 64, 64, 4, 16, true, true, true, {}, kI, kB}}) {
    SCOPED_TRACE(c.name);
    check::Problem p = make(c, 950 + c.L);
    check::HostTensor out = p.make_out(c.dtype);
    const ForwardArgs f = forward_args(p, out, Lane::kCuda);
    int64_t with_y = 0, without_y = 0;
    ASSERT_TRUE(cuda::saved_numel_staged(f, &with_y).ok());
    {
      ScopedEnv off("MAMBA3_CUDA_SAVE_Y", "0");
      ASSERT_TRUE(cuda::saved_numel_staged(f, &without_y).ok());
    }
    const int64_t cells = c.B * ((c.L + 64 / c.R - 1) / (64 / c.R)) * c.H;
    EXPECT_GE(with_y - without_y, cells * 64 * c.P) << "y: 64 x P fp32 per cell";
    EXPECT_LE(with_y - without_y, cells * 64 * c.P + 64) << "y: 64 x P fp32 per cell";
    {
      ScopedEnv bad("MAMBA3_CUDA_SAVE_Y", "yes");
      int64_t n = 0;
      const Status st = cuda::saved_numel_staged(f, &n);
      EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
      EXPECT_NE(st.message().find("MAMBA3_CUDA_SAVE_Y"), std::string::npos) << st.message();
    }
    ScopedEnv off("MAMBA3_CUDA_SAVE_Y", "0");
    RunOptions o;
    o.out_dtype = c.dtype;
    o.use_saved = true;
    const Result saved = run(p, Eval::kCuda, o);
    expect_bitwise_equal(run(p, Eval::kCuda, o), saved, "two saved-mode runs without y");
    o.use_saved = false;
    const Result ref = grads_only(run(p, Eval::kReference, o));
    const Result naive = grads_only(run(p, Eval::kNaiveF32, o));
    expect_within_bar_or_recipe(grads_only(saved), ref, naive, kTcGradTol,
                                p.config().describe() + " (saved tiles without y)");
  }
}

// MAMBA3_CUDA_SAVE_TILES=0 turns saving off (saved_numel 0); another value is an error naming it.
TEST(CudaBackward, SaveTilesGate) {
  REQUIRE_GPU();
  Case c{"gate", 1, 100, 2, 1, 128, 64, 1, 32, true, false, false, {}, kI, kB};
  check::Problem p = make(c, 4);
  check::HostTensor out = p.make_out(DType::kBF16);
  ForwardArgs f = forward_args(p, out, Lane::kCuda);
  int64_t n = -1;
  {
    ScopedEnv off("MAMBA3_CUDA_SAVE_TILES", "0");
    const Status st = cuda::saved_numel_staged(f, &n);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_EQ(n, 0);
  }
  {
    ScopedEnv bad("MAMBA3_CUDA_SAVE_TILES", "yes");
    const Status st = cuda::saved_numel_staged(f, &n);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
    EXPECT_NE(st.message().find("MAMBA3_CUDA_SAVE_TILES"), std::string::npos) << st.message();
  }
  ASSERT_TRUE(cuda::saved_numel_staged(f, &n).ok());
  EXPECT_GT(n, 0);
  // A buffer of another size is an error naming `saved` and the expected size.
  std::vector<float> small(static_cast<size_t>(n - 64), 0.f);
  f.saved = make_tensor(small.data(), DType::kF32, {n - 64});
  const Status st = cuda::forward_staged(f);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  EXPECT_NE(st.message().find("saved"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find(std::to_string(n)), std::string::npos) << st.message();
}

// The PsiV cache (MAMBA3_PSIV_CACHE, DESIGN §3) on the tensor-core path: on, the tile records
// carry v psi (the training forward's saved buffer grows by rows x P bf16 per cell) and the
// backward copies it back; off, it computes it from the raw v and psi; unset, on where psi is
// given. Both give the same bits, saved or recomputing, SISO and MIMO (psi sums, GQA, P = 128,
// packed sequences, split forward). A buffer saved under one setting is refused by the other
// (its size differs), naming the gate; off the tensor-core path setting the gate to 1 fails,
// naming it.
TEST(CudaBackward, PsivCacheGate) {
  REQUIRE_GPU();
  for (const SegCase& gc :
       {SegCase{{"psiv_siso", 2, 300, 4, 1, 128, 64, 1, 32, true, false, false, {}, kI, kB},
                nullptr},
        SegCase{{"psiv_mimo_gqa_norm", 2, 130, 4, 2, 128, 64, 4, 32, true, true, true, {}, kH,
                 kB},
                nullptr},
        SegCase{{"psiv_p128_r2", 1, 130, 2, 1, 64, 128, 2, 32, true, false, true, {}, kI, kB},
                nullptr},
        SegCase{{"psiv_split_mimo_varlen", 1, 300, 2, 1, 64, 64, 2, 16, true, false, true,
                 {100, 0, 137, 63}, kI, kB},
                "128"}}) {
    const Case& c = gc.c;
    SCOPED_TRACE(c.name);
    ScopedEnv seg("MAMBA3_CUDA_SEG_LEN", gc.seg_len);
    check::Problem p = make(c, 1700 + c.L);
    check::HostTensor out = p.make_out(c.dtype);
    const ForwardArgs f = forward_args(p, out, Lane::kCuda);
    int64_t n_off = 0, n_on = 0, n_unset = 0;
    {
      ScopedEnv off("MAMBA3_PSIV_CACHE", "0");
      ASSERT_TRUE(cuda::saved_numel_staged(f, &n_off).ok());
    }
    {
      ScopedEnv on("MAMBA3_PSIV_CACHE", "1");
      ASSERT_TRUE(cuda::saved_numel_staged(f, &n_on).ok());
    }
    {
      ScopedEnv unset("MAMBA3_PSIV_CACHE", nullptr);
      ASSERT_TRUE(cuda::saved_numel_staged(f, &n_unset).ok());
    }
    EXPECT_GT(n_on, n_off) << "the records with v psi should be larger";
    // Unset: the cache where psi (mimo_v) is given (the MIMO cases here), not without it.
    EXPECT_EQ(n_unset, p.inputs().mimo_v.defined() ? n_on : n_off);
    RunOptions o;
    o.out_dtype = c.dtype;
    Result plain_off, saved_off, plain_on, saved_on;
    {
      ScopedEnv off("MAMBA3_PSIV_CACHE", "0");
      plain_off = run(p, Eval::kCuda, o);
      o.use_saved = true;
      saved_off = run(p, Eval::kCuda, o);
      o.use_saved = false;
    }
    {
      ScopedEnv on("MAMBA3_PSIV_CACHE", "1");
      plain_on = run(p, Eval::kCuda, o);
      o.use_saved = true;
      saved_on = run(p, Eval::kCuda, o);
      o.use_saved = false;
    }
    expect_bitwise_equal(plain_on, plain_off, "recomputing backward, cache on vs off");
    expect_bitwise_equal(saved_on, saved_off, "saved buffer, cache on vs off");
    const Result ref = grads_only(run(p, Eval::kReference, o));
    const Result naive = grads_only(run(p, Eval::kNaiveF32, o));
    expect_within_bar_or_recipe(grads_only(saved_on), ref, naive, kTcGradTol,
                                p.config().describe() + " (PsiV cache)");
  }
  // A buffer saved with the cache, read back without it: refused, naming the gate.
  Case c{"psiv_mismatch", 1, 100, 2, 1, 64, 64, 4, 16, true, false, true, {}, kI, kB};
  check::Problem p = make(c, 6);
  check::HostTensor out = p.make_out(DType::kBF16);
  ForwardArgs f = forward_args(p, out, Lane::kCuda);
  int64_t n = 0;
  std::vector<float> saved;
  {
    ScopedEnv on("MAMBA3_PSIV_CACHE", "1");
    ASSERT_TRUE(cuda::saved_numel_staged(f, &n).ok());
    saved.assign(static_cast<size_t>(n), 0.f);
    f.saved = make_tensor(saved.data(), DType::kF32, {n});
    const Status st = cuda::forward_staged(f);
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  check::HostTensor dout = p.random_d_out(DType::kBF16, 7);
  check::StateBuffers ds = p.random_d_states(7);
  check::GradBuffers g = p.make_grads(false);
  BackwardArgs b = backward_args(p.inputs(), dout, ds, g, Lane::kCuda);
  b.saved = f.saved;
  ScopedEnv off("MAMBA3_PSIV_CACHE", "0");
  Status st = cuda::backward_staged(b);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  EXPECT_NE(st.message().find("MAMBA3_PSIV_CACHE"), std::string::npos) << st.message();
  // fp32 inputs take the SIMT kernels: the gate fails there, forward and backward.
  Case cf{"psiv_simt", 1, 100, 2, 1, 64, 64, 4, 16, true, false, true, {}, kI, kF};
  check::Problem pf = make(cf, 8);
  check::HostTensor outf = pf.make_out(DType::kF32);
  check::HostTensor doutf = pf.random_d_out(DType::kF32, 7);
  check::StateBuffers dsf = pf.random_d_states(7);
  check::GradBuffers gf = pf.make_grads(false);
  {  // unset: the default (no cache there), no error
    ScopedEnv unset("MAMBA3_PSIV_CACHE", nullptr);
    const Status s = cuda::forward_staged(forward_args(pf, outf, Lane::kCuda));
    EXPECT_TRUE(s.ok()) << s.ToString();
  }
  ScopedEnv on("MAMBA3_PSIV_CACHE", "1");
  for (const Status& s : {cuda::forward_staged(forward_args(pf, outf, Lane::kCuda)),
                          cuda::backward_staged(backward_args(pf.inputs(), doutf, dsf, gf,
                                                              Lane::kCuda))}) {
    EXPECT_EQ(s.code(), StatusCode::kNotSupported) << s.ToString();
    EXPECT_NE(s.message().find("MAMBA3_PSIV_CACHE"), std::string::npos) << s.message();
  }
}

// Off the tensor-core path the cuda lane saves nothing: saved_numel is 0, an empty buffer is
// accepted and changes no bit, a non-empty one is an error naming the expected size.
TEST(CudaBackward, EmptySavedBufferChangesNothing) {
  REQUIRE_GPU();
  Case c{"saved", 1, 130, 2, 1, 64, 64, 2, 16, true, true, true, {}, kH, kF};
  check::Problem p = make(c, 3);
  check::HostTensor dout = p.random_d_out(DType::kF32, 7);
  check::StateBuffers ds = p.random_d_states(7);
  check::GradBuffers g1 = p.make_grads(false), g2 = p.make_grads(false), g3 = p.make_grads(false);
  BackwardArgs b1 = backward_args(p.inputs(), dout, ds, g1, Lane::kCuda);
  Status st = cuda::backward_staged(b1);
  ASSERT_TRUE(st.ok()) << st.ToString();
  BackwardArgs b2 = backward_args(p.inputs(), dout, ds, g2, Lane::kCuda);
  b2.saved = make_tensor(nullptr, DType::kF32, {0});
  st = cuda::backward_staged(b2);
  ASSERT_TRUE(st.ok()) << st.ToString();
  expect_bitwise_equal(collect(g1), collect(g2), "empty saved buffer vs none");
  std::vector<float> junk(16, 1.f);
  BackwardArgs b3 = backward_args(p.inputs(), dout, ds, g3, Lane::kCuda);
  b3.saved = make_tensor(junk.data(), DType::kF32, {16});
  st = cuda::backward_staged(b3);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  EXPECT_NE(st.message().find("(0,)"), std::string::npos) << st.message();
}

// The workspace pool keeps a backward's memory after the call (the default pool would hand it
// back at the staged call's synchronization); release_cached_memory returns it, once; the next
// backward allocates again and gives the same bits.
TEST(CudaBackward, WorkspacePoolKeepsAndReleases) {
  REQUIRE_GPU();
  Case c{"pool", 1, 300, 4, 1, 128, 64, 1, 32, true, false, false, {}, kI, kB};
  check::Problem p = make(c, 5);
  check::HostTensor dout = p.random_d_out(DType::kBF16, 7);
  check::StateBuffers ds = p.random_d_states(7);
  check::GradBuffers g1 = p.make_grads(false), g2 = p.make_grads(false);
  size_t released = 0;
  ASSERT_TRUE(release_cached_memory(&released).ok());  // start from an empty pool
  Status st = cuda::backward_staged(backward_args(p.inputs(), dout, ds, g1, Lane::kCuda));
  ASSERT_TRUE(st.ok()) << st.ToString();
  st = release_cached_memory(&released);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_GT(released, 0u) << "the pool kept no workspace of the backward";
  st = release_cached_memory(&released);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(released, 0u) << "a second release found cached memory";
  st = cuda::backward_staged(backward_args(p.inputs(), dout, ds, g2, Lane::kCuda));
  ASSERT_TRUE(st.ok()) << st.ToString();
  expect_bitwise_equal(collect(g1), collect(g2), "backward after the pool was released");
}

// The backward allocates its workspace stream-ordered and never synchronizes, so it can be
// captured in a CUDA graph; a replay gives the same bits as a direct call.
// Both kernel families: fp32 (SIMT) and bf16 at N = P = 64 (tensor cores).
class CudaBackwardGraph : public testing::TestWithParam<Case> {};

TEST_P(CudaBackwardGraph, CapturableInGraph) {
  REQUIRE_GPU();
  const Case& c = GetParam();
  ScopedEnv mimo_tc("MAMBA3_CUDA_BWD_MIMO_TC", opts_out_of_mimo_tc(c) ? "0" : nullptr);
  check::Problem p = make(c, 5);
  check::HostTensor dout = p.random_d_out(c.dtype, 7);
  check::StateBuffers ds = p.random_d_states(7);
  check::GradBuffers g1 = p.make_grads(false), g2 = p.make_grads(false);
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  {
    cuda::Staging st;
    BackwardArgs d;
    ASSERT_TRUE(st.stage_backward(backward_args(p.inputs(), dout, ds, g1, Lane::kCuda), &d).ok());
    d.stream = stream;
    ASSERT_TRUE(backward(d).ok());
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const Grads& g = d.grads;
    ASSERT_TRUE(st.copy_back_all({&g.q, &g.k, &g.v, &g.adt, &g.dt, &g.trap, &g.q_bias, &g.k_bias,
                                  &g.angles, &g.d, &g.z, &g.mimo_v, &g.mimo_z, &g.mimo_o,
                                  &g.norm_weight, &g.initial.angle, &g.initial.ssm, &g.initial.k,
                                  &g.initial.v})
                    .ok());
  }
  {
    cuda::Staging st;
    BackwardArgs d;
    ASSERT_TRUE(st.stage_backward(backward_args(p.inputs(), dout, ds, g2, Lane::kCuda), &d).ok());
    d.stream = stream;
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
    Status cap = backward(d);
    const cudaError_t ended = cudaStreamEndCapture(stream, &graph);
    ASSERT_EQ(ended, cudaSuccess) << cudaGetErrorString(ended) << " (backward: " << cap.ToString()
                                  << ")";
    ASSERT_TRUE(cap.ok()) << cap.ToString();
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const Grads& g = d.grads;
    ASSERT_TRUE(st.copy_back_all({&g.q, &g.k, &g.v, &g.adt, &g.dt, &g.trap, &g.q_bias, &g.k_bias,
                                  &g.angles, &g.d, &g.z, &g.mimo_v, &g.mimo_z, &g.mimo_o,
                                  &g.norm_weight, &g.initial.angle, &g.initial.ssm, &g.initial.k,
                                  &g.initial.v})
                    .ok());
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  cudaStreamDestroy(stream);
  expect_bitwise_equal(collect(g2), collect(g1), "graph replay vs direct backward");
}

INSTANTIATE_TEST_SUITE_P(
    Kernels, CudaBackwardGraph,
    testing::Values(Case{"graph_simt", 2, 100, 4, 2, 64, 32, 2, 16, true, true, true, {}, kH, kF},
                    Case{"graph_tc", 2, 100, 4, 2, 64, 64, 2, 16, true, true, true, {}, kH, kB}),
    [](const testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

TEST(CudaBackward, UnsupportedConfigurationSaysSo) {
  REQUIRE_GPU();
  Case c{"big", 1, 8, 2, 1, 256, 64, 1, 16, false, false, false, {}, kI, kF};
  check::Problem p = make(c, 1);
  check::HostTensor dout = p.random_d_out(DType::kF32, 7);
  check::StateBuffers ds = p.random_d_states(7);
  check::GradBuffers g = p.make_grads(false);
  Status st = cuda::backward_staged(backward_args(p.inputs(), dout, ds, g, Lane::kCuda));
  EXPECT_EQ(st.code(), StatusCode::kNotSupported) << st.ToString();
  EXPECT_NE(st.message().find("N = 256"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace mamba3::test
