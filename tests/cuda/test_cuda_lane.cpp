// The cuda lane on a GPU: golden forward outputs, the random-problem matrix against the
// float64 reference (tolerance recipe), decode steps == prefill, a step captured in a CUDA
// graph, determinism and strided inputs. Every test skips cleanly without a device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <filesystem>

#include "check/golden.h"
#include "cuda/common/staging.cuh"
#include "test_util.h"

namespace mamba3::test {
namespace {

TEST(CudaGolden, ForwardOutputsAndFinalStates) {
  REQUIRE_GPU();
  for (const char* f : {"golden_public_siso.safetensors", "golden_public_mimo.safetensors"}) {
    std::vector<check::CaseReport> reports;
    Status st = check::run_golden_file(golden_path(f), Lane::kCuda, &reports, true);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ASSERT_FALSE(reports.empty());
    for (const auto& r : reports) {
      EXPECT_TRUE(r.status.ok()) << r.case_name << ": " << r.status.ToString();
      EXPECT_GE(r.metrics.size(), 5u) << r.case_name;
      for (const auto& m : r.metrics) EXPECT_TRUE(m.pass) << r.case_name << "\n" << check::format_metric(m);
    }
  }
}

bool tensor_core_case(const Case& c) {
  return c.dtype == DType::kBF16 && (c.N == 64 || c.N == 128) && (c.P == 64 || c.P == 128);
}

// The cuda forward of problem p against the float64 reference: the recipe, or for the
// tensor-core path the bf16 bar (expect_tc_forward_within_bar, test_util.h; the CPU
// emulation of these kernels, tests/emu/test_fwd_emu.cpp, holds them to the same).
void expect_cuda_forward(const check::Problem& p, bool tensor_cores, DType out_dtype,
                         const std::string& label) {
  RunOptions o;
  o.backward = false;
  o.out_dtype = out_dtype;
  Result ref = run(p, Eval::kReference, o);
  Result naive = run(p, Eval::kNaiveF32, o);
  Result got = run(p, Eval::kCuda, o);
  if (tensor_cores) {
    expect_tc_forward_within_bar(got, ref, naive, label);
    return;
  }
  expect_within_recipe(got, ref, naive, label);
}

class CudaVsReference : public testing::TestWithParam<Case> {};

TEST_P(CudaVsReference, ForwardWithinRecipe) {
  REQUIRE_GPU();
  const Case& c = GetParam();
  check::Problem p = make(c, 500 + c.L);
  expect_cuda_forward(p, tensor_core_case(c), c.dtype, p.config().describe());
}

// Sets an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (had_)
      setenv(name_, old_.c_str(), 1);
    else
      unsetenv(name_);
  }

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

// The sequence split (segment states, combine, segments from their start states) forced onto
// short segments, so small problems cross several segment boundaries.
class CudaSegmented : public testing::TestWithParam<Case> {};

TEST_P(CudaSegmented, SplitForwardMatchesReference) {
  REQUIRE_GPU();
  const Case& c = GetParam();
  check::Problem p = make(c, 900 + c.L);
  for (const char* seg : {"64", "128"}) {
    ScopedEnv env("MAMBA3_CUDA_SEG_LEN", seg);
    expect_cuda_forward(p, true, c.dtype,
                        p.config().describe() + " MAMBA3_CUDA_SEG_LEN=" + seg);
  }
  // The state pass cut finer (64-token state segments, output segments of 128).
  ScopedEnv env("MAMBA3_CUDA_SEG_LEN", "128");
  ScopedEnv sub("MAMBA3_CUDA_SEG_SUB", "2");
  expect_cuda_forward(p, true, c.dtype,
                      p.config().describe() + " MAMBA3_CUDA_SEG_LEN=128 MAMBA3_CUDA_SEG_SUB=2");
}

// Many segments of one (sequence, head): 101 segments x NA = 64 start angles are more than the
// 48 KB of shared memory a launch gets without opting in (fwd_tc_combine once kept them there).
TEST(CudaSegmentedForward, ManySegmentsOfOneSequence) {
  REQUIRE_GPU();
  Case c{"seg_many", 1, 6437, 1, 1, 128, 64, 1, 64, true, false, false, {},
         RopePairing::kInterleaved, DType::kBF16};
  check::Problem p = make(c, 79);
  ScopedEnv env("MAMBA3_CUDA_SEG_LEN", "64");
  expect_cuda_forward(p, true, c.dtype, p.config().describe() + " MAMBA3_CUDA_SEG_LEN=64");
  ScopedEnv env2("MAMBA3_CUDA_SEG_LEN", "192");
  ScopedEnv sub("MAMBA3_CUDA_SEG_SUB", "3");
  expect_cuda_forward(p, true, c.dtype,
                      p.config().describe() + " MAMBA3_CUDA_SEG_LEN=192 MAMBA3_CUDA_SEG_SUB=3");
}

TEST(CudaSegmentedForward, BitwiseDeterministicAndBadOverrideNamed) {
  REQUIRE_GPU();
  Case c{"seg_det", 2, 700, 4, 1, 128, 64, 1, 32, true, true, false, {},
         RopePairing::kInterleaved, DType::kBF16};
  check::Problem p = make(c, 77);
  RunOptions o;
  o.backward = false;
  o.out_dtype = DType::kBF16;
  {
    ScopedEnv env("MAMBA3_CUDA_SEG_LEN", "192");
    expect_bitwise_equal(run(p, Eval::kCuda, o), run(p, Eval::kCuda, o), "two split cuda runs");
    ScopedEnv sub("MAMBA3_CUDA_SEG_SUB", "3");
    expect_bitwise_equal(run(p, Eval::kCuda, o), run(p, Eval::kCuda, o),
                         "two split cuda runs, state pass cut in 3");
  }
  ScopedEnv env("MAMBA3_CUDA_SEG_LEN", "100");
  check::HostTensor out = p.make_out(DType::kBF16);
  Status st = cuda::forward_staged(forward_args(p, out));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  EXPECT_NE(st.message().find("MAMBA3_CUDA_SEG_LEN"), std::string::npos) << st.message();
}

// The split forward allocates its segment workspace stream-ordered (a graph allocation node
// under capture): capturable, and a replay gives the bits of a direct call.
TEST(CudaSegmentedForward, CapturableInGraph) {
  REQUIRE_GPU();
  Case c{"seg_graph", 2, 300, 4, 1, 128, 64, 1, 32, true, true, false, {},
         RopePairing::kHalved, DType::kBF16};
  check::Problem p = make(c, 78);
  ScopedEnv env("MAMBA3_CUDA_SEG_LEN", "64");
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  auto run_once = [&](bool graph, check::HostTensor* out, check::StateBuffers* fin) {
    ForwardArgs h;
    h.in = p.inputs();
    h.out = out->view();
    h.final_states = fin->view();
    cuda::Staging st;
    ForwardArgs d;
    ASSERT_TRUE(st.stage_forward(h, &d).ok());
    d.stream = stream;
    if (graph) {
      cudaGraph_t g;
      cudaGraphExec_t exec;
      ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
      const Status cap = forward(d);
      ASSERT_EQ(cudaStreamEndCapture(stream, &g), cudaSuccess);
      ASSERT_TRUE(cap.ok()) << cap.ToString();
      ASSERT_EQ(cudaGraphInstantiate(&exec, g, 0), cudaSuccess);
      ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(g);
    } else {
      const Status direct = forward(d);
      ASSERT_TRUE(direct.ok()) << direct.ToString();
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    }
    ASSERT_TRUE(st.copy_back_all({&d.out, &d.final_states.angle, &d.final_states.ssm,
                                  &d.final_states.k, &d.final_states.v})
                    .ok());
  };
  check::HostTensor out1 = p.make_out(DType::kBF16), out2 = p.make_out(DType::kBF16);
  check::StateBuffers f1 = p.make_states(), f2 = p.make_states();
  run_once(false, &out1, &f1);
  run_once(true, &out2, &f2);
  cudaStreamDestroy(stream);
  expect_bitwise_equal({{"out", out2.to_double()}, {"final.ssm", f2.ssm.to_double()}},
                       {{"out", out1.to_double()}, {"final.ssm", f1.ssm.to_double()}},
                       "graph replay vs direct split forward");
}

INSTANTIATE_TEST_SUITE_P(
    Matrix, CudaVsReference,
    testing::Values(
        Case{"siso_L1", 2, 1, 2, 1, 64, 64, 1, 16, true, false, false, {}, kI, kF},
        Case{"siso_L63", 1, 63, 2, 1, 64, 32, 1, 16, true, false, false, {}, kI, kF},
        Case{"siso_L64", 1, 64, 4, 2, 128, 64, 1, 32, false, false, false, {}, kI, kF},
        Case{"siso_L65_norm", 2, 65, 4, 2, 128, 64, 1, 64, true, true, false, {}, kI, kF},
        Case{"siso_L331_halved", 1, 331, 2, 1, 64, 64, 1, 16, true, false, false, {}, kH, kF},
        Case{"siso_P128", 1, 200, 2, 1, 128, 128, 1, 32, true, true, false, {}, kI, kF},
        Case{"siso_L0", 2, 0, 2, 1, 64, 64, 1, 16, true, false, false, {}, kI, kF},
        Case{"mimo_r2", 1, 67, 2, 1, 64, 64, 2, 16, true, false, true, {}, kH, kF},
        Case{"mimo_r4_gqa", 2, 130, 4, 2, 128, 64, 4, 32, true, true, true, {}, kH, kF},
        Case{"mimo_r4_per_rank", 1, 45, 2, 1, 64, 32, 4, 16, false, false, false, {}, kI, kF},
        Case{"mimo_r8", 1, 33, 2, 1, 64, 64, 8, 16, true, false, true, {}, kH, kF},
        Case{"varlen", 1, 150, 2, 1, 64, 64, 1, 16, true, false, false, {70, 0, 1, 64, 15}, kI, kF},
        Case{"bf16_siso", 2, 300, 4, 1, 128, 64, 1, 32, true, false, false, {}, kI, kB},
        Case{"bf16_mimo", 1, 200, 4, 1, 128, 64, 4, 32, true, true, true, {}, kH, kB},
        Case{"tc_siso_L1", 2, 1, 2, 1, 64, 64, 1, 16, true, false, false, {}, kI, kB},
        // NA not a multiple of 4: the angle tiles take the out-of-line 4-byte copy.
        Case{"tc_siso_na6", 1, 100, 2, 1, 64, 64, 1, 6, true, false, false, {}, kI, kB},
        Case{"tc_siso_N128_na10", 2, 150, 2, 1, 128, 64, 1, 10, false, true, false, {}, kH, kB},
        Case{"tc_siso_N64_P128", 1, 130, 4, 2, 64, 128, 1, 32, true, true, false, {}, kH, kB},
        Case{"tc_siso_N128_P128", 1, 129, 2, 1, 128, 128, 1, 64, true, false, false, {}, kI, kB},
        Case{"tc_mimo_r2_varlen", 1, 200, 2, 1, 64, 64, 2, 16, true, false, true,
             {80, 0, 63, 57}, kI, kB},
        Case{"tc_mimo_r8", 1, 70, 2, 1, 128, 64, 8, 32, true, true, true, {}, kH, kB},
        Case{"tc_mimo_per_rank", 1, 50, 2, 1, 64, 64, 4, 16, false, false, false, {}, kH, kB}),
    [](const testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

INSTANTIATE_TEST_SUITE_P(
    TensorCores, CudaSegmented,
    testing::Values(
        Case{"siso_states_norm", 2, 333, 4, 1, 128, 64, 1, 32, true, true, false, {}, kI, kB},
        Case{"siso_halved_N64", 1, 300, 2, 1, 64, 64, 1, 16, true, false, false, {}, kH, kB},
        Case{"siso_no_states", 1, 260, 2, 1, 128, 64, 1, 64, false, false, false, {}, kI, kB},
        Case{"mimo_r4_varlen", 1, 400, 2, 1, 64, 64, 4, 16, true, true, true,
             {150, 0, 64, 186}, kH, kB},
        Case{"siso_P128", 1, 200, 2, 1, 128, 128, 1, 32, true, false, false, {}, kI, kB}),
    [](const testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

TEST(CudaForward, BitwiseDeterministic) {
  REQUIRE_GPU();
  Case c{"det", 2, 300, 4, 2, 128, 64, 4, 32, true, true, true, {}, kH, kF};
  check::Problem p = make(c, 8);
  RunOptions o;
  o.backward = false;
  expect_bitwise_equal(run(p, Eval::kCuda, o), run(p, Eval::kCuda, o), "two cuda runs");
}

TEST(CudaForward, UnsupportedConfigurationSaysSo) {
  REQUIRE_GPU();
  Case c{"big", 1, 8, 2, 1, 256, 64, 1, 16, false, false, false, {}, kI, kF};
  check::Problem p = make(c, 1);
  check::HostTensor out = p.make_out(DType::kF32);
  Status st = cuda::forward_staged(forward_args(p, out));
  EXPECT_EQ(st.code(), StatusCode::kNotSupported) << st.ToString();
  EXPECT_NE(st.message().find("N = 256"), std::string::npos) << st.message();
}

// Decode steps through the cuda lane reproduce the float64 prefill: the fast kernel (fp32 float4
// state rows, N in {64, 128}, P % 16 == 0; R = 1, 2 with k in registers, 4 and 8 from shared
// memory) and the general one (N = 32; P = 24), with and without the norm, both rope pairings.
TEST(CudaStep, StepsEqualPrefill) {
  REQUIRE_GPU();
  struct StepCase {
    int64_t N, P, R;
    bool interleaved;
  };
  for (const StepCase& k : {StepCase{64, 32, 1, false}, StepCase{64, 32, 4, true},
                            StepCase{128, 64, 2, false}, StepCase{128, 128, 8, true},
                            StepCase{64, 128, 1, true}, StepCase{32, 16, 1, false},
                            StepCase{64, 24, 2, false}}) {
    const int64_t R = k.R;
    SCOPED_TRACE("N=" + std::to_string(k.N) + " P=" + std::to_string(k.P) + " R=" +
                 std::to_string(R));
    check::ProblemConfig cfg = check::default_config(3, 24, 4, 2, k.N, k.P, R, 60 + R + k.N);
    cfg.NA = k.N / 4;
    cfg.rope_pairing = k.interleaved ? RopePairing::kInterleaved : RopePairing::kHalved;
    cfg.has_states = true;
    cfg.has_norm = R > 1;
    check::Problem p(cfg);
    RunOptions o;
    o.backward = false;
    Result pre = run(p, Eval::kReference, o);
    Result naive = run(p, Eval::kNaiveF32, o);
    check::StateBuffers st = p.initial;
    check::HostTensor out = p.make_out(DType::kF32);
    for (int64_t t = 0; t < cfg.L; ++t) {
      StepArgs s = step_view(p, t, st.view(), out, Lane::kCuda);
      Status r = cuda::step_staged(s);
      ASSERT_TRUE(r.ok()) << r.ToString();
    }
    Result got{{"out", out.to_double()}};
    put_states(&got, st);
    expect_within_recipe(got, pre, naive,
                         "cuda steps vs float64 prefill, N=" + std::to_string(k.N) + " P=" +
                             std::to_string(k.P) + " R=" + std::to_string(R));
  }
}

// The fast step kernel's two CTA sizes (MAMBA3_CUDA_STEP_THREADS = 128 or 256) give the same
// bits (same per-element arithmetic and lane reductions); any other value is an error naming
// the variable.
TEST(CudaStep, ThreadCountsAgreeBitwise) {
  REQUIRE_GPU();
  check::ProblemConfig cfg = check::default_config(3, 6, 4, 2, 128, 64, 4, 77);
  cfg.NA = 32;
  cfg.has_states = true;
  cfg.has_norm = true;
  check::Problem p(cfg);
  auto steps = [&](const char* threads, Status* last) {
    const ScopedEnv env("MAMBA3_CUDA_STEP_THREADS", threads);  // unset again on return
    check::StateBuffers st = p.initial;
    check::HostTensor out = p.make_out(DType::kF32);
    *last = Status::Ok();
    for (int64_t t = 0; t < cfg.L && last->ok(); ++t)
      *last = cuda::step_staged(step_view(p, t, st.view(), out, Lane::kCuda));
    Result r{{"out", out.to_double()}};
    put_states(&r, st);
    return r;
  };
  Status s128, s256, bad;
  const Result a = steps("128", &s128), b = steps("256", &s256);
  ASSERT_TRUE(s128.ok()) << s128.ToString();
  ASSERT_TRUE(s256.ok()) << s256.ToString();
  expect_bitwise_equal(a, b, "step kernel, 128 vs 256 threads");
  steps("96", &bad);
  EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument) << bad.ToString();
  EXPECT_NE(bad.message().find("MAMBA3_CUDA_STEP_THREADS"), std::string::npos) << bad.message();
}

// The persistent kernel (MAMBA3_CUDA_STEP_PERSISTENT=1; fails rather than falls back) with
// fewer CTAs than (batch, head) items (MAMBA3_CUDA_STEP_CTAS), so its grid-stride loop and
// prefetch run: within the recipe of the float64 prefill for bf16, fp16 and fp32 inputs, and
// equal to the previous fast kernel (MAMBA3_CUDA_STEP_PERSISTENT=0) within the same recipe
// (same arithmetic per element; only the compiler's FMA contraction may differ between them).
TEST(CudaStep, PersistentStepsEqualPrefill) {
  REQUIRE_GPU();
  struct PCase {
    int64_t B, H, G, N, P, R;
    DType dtype;
    bool interleaved, norm;
    const char *threads, *ctas;
  };
  for (const PCase& k : {PCase{5, 4, 1, 128, 64, 1, kB, true, false, "128", "3"},
                         PCase{5, 4, 2, 128, 64, 1, kB, false, true, "256", "7"},
                         PCase{3, 4, 1, 64, 128, 1, kF, true, false, "256", "2"},
                         PCase{3, 4, 1, 128, 64, 4, kB, false, true, "256", "5"},
                         PCase{2, 4, 2, 64, 64, 4, kF16, true, false, "128", "3"},
                         PCase{2, 3, 1, 128, 128, 2, kF, false, true, "256", "4"},
                         PCase{2, 2, 1, 64, 64, 8, kB, true, true, "256", "3"},
                         PCase{4, 8, 1, 128, 64, 1, kB, true, false, nullptr, nullptr}}) {
    const std::string label = "B=" + std::to_string(k.B) + " H=" + std::to_string(k.H) +
                              " N=" + std::to_string(k.N) + " P=" + std::to_string(k.P) +
                              " R=" + std::to_string(k.R) + " " + dtype_name(k.dtype) +
                              " ctas=" + (k.ctas ? k.ctas : "default");
    SCOPED_TRACE(label);
    check::ProblemConfig cfg = check::default_config(k.B, 6, k.H, k.G, k.N, k.P, k.R, 90 + k.R);
    cfg.has_states = true;
    cfg.has_norm = k.norm;
    cfg.dtype = k.dtype;
    cfg.rope_pairing = k.interleaved ? RopePairing::kInterleaved : RopePairing::kHalved;
    check::Problem p(cfg);
    RunOptions o;
    o.backward = false;
    const Result pre = run(p, Eval::kReference, o);
    const Result naive = run(p, Eval::kNaiveF32, o);
    const ScopedEnv threads("MAMBA3_CUDA_STEP_THREADS", k.threads ? k.threads : "");
    const ScopedEnv ctas("MAMBA3_CUDA_STEP_CTAS", k.ctas ? k.ctas : "");
    auto steps = [&](const char* persistent) {
      const ScopedEnv gate("MAMBA3_CUDA_STEP_PERSISTENT", persistent);
      check::StateBuffers st = p.initial;
      check::HostTensor out = p.make_out(DType::kF32);
      for (int64_t t = 0; t < cfg.L; ++t) {
        const Status r = cuda::step_staged(step_view(p, t, st.view(), out, Lane::kCuda));
        EXPECT_TRUE(r.ok()) << r.ToString();
      }
      Result got{{"out", out.to_double()}};
      put_states(&got, st);
      return got;
    };
    const Result persistent = steps("1"), fast = steps("0");
    expect_within_recipe(persistent, pre, naive, label + " persistent vs float64 prefill");
    expect_within_recipe(persistent, fast, naive, label + " persistent vs fast kernel");
  }
}

// A step captured in a CUDA graph and replayed equals the same steps launched directly.
TEST(CudaStep, CapturableInGraph) {
  REQUIRE_GPU();
  check::ProblemConfig cfg = check::default_config(4, 1, 8, 1, 128, 64, 1, 9);
  cfg.NA = 32;
  cfg.has_states = true;
  check::Problem p(cfg);
  std::vector<void*> owned;
  auto dev = [&](const check::HostTensor& h) {
    Tensor t = h.view();
    if (!t.defined()) return t;
    const size_t bytes = static_cast<size_t>(h.numel() * dtype_size(h.dtype()));
    void* ptr = nullptr;
    EXPECT_EQ(cudaMalloc(&ptr, bytes), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(ptr, h.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
    owned.push_back(ptr);
    t.data = ptr;
    t.device = Device::kCUDA;
    return t;
  };
  auto squeeze = [](Tensor t, int axis) {
    for (int d = axis; d + 1 < t.ndim; ++d) t.shape[d] = t.shape[d + 1], t.strides[d] = t.strides[d + 1];
    --t.ndim;
    return t;
  };
  StepArgs s;
  s.q = squeeze(dev(p.q), 1), s.k = squeeze(dev(p.k), 1), s.v = squeeze(dev(p.v), 1);
  s.adt = squeeze(dev(p.adt), 2), s.dt = squeeze(dev(p.dt), 2), s.trap = squeeze(dev(p.trap), 2);
  s.angles = squeeze(dev(p.angles), 1), s.z = squeeze(dev(p.z), 1);
  s.q_bias = dev(p.q_bias), s.k_bias = dev(p.k_bias), s.d = dev(p.d);
  check::HostTensor out = p.make_out(DType::kF32);
  s.out = squeeze(dev(out), 1);
  auto fresh_states = [&]() {
    return States{dev(p.initial.angle), dev(p.initial.ssm), dev(p.initial.k), dev(p.initial.v)};
  };
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  s.stream = stream;
  s.lane = Lane::kCuda;
  // Direct: 5 steps.
  s.state = fresh_states();
  for (int i = 0; i < 5; ++i) {
    const Status st = step(s);
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  check::HostTensor direct(DType::kF32, p.initial.ssm.shape());
  ASSERT_EQ(cudaMemcpy(direct.data(), s.state.ssm.data, direct.numel() * 4, cudaMemcpyDeviceToHost),
            cudaSuccess);
  // Graph: capture one step, replay 5 times; the persistent kernel (the default here) with 5
  // CTAs for the 32 (batch, head) items, so the capture holds its grid-stride loop too.
  const ScopedEnv ctas("MAMBA3_CUDA_STEP_CTAS", "5");
  s.state = fresh_states();
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
  Status cap = step(s);
  ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
  ASSERT_TRUE(cap.ok()) << cap.ToString();
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  for (int i = 0; i < 5; ++i) ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  check::HostTensor graphed(DType::kF32, p.initial.ssm.shape());
  ASSERT_EQ(cudaMemcpy(graphed.data(), s.state.ssm.data, graphed.numel() * 4,
                       cudaMemcpyDeviceToHost),
            cudaSuccess);
  expect_bitwise_equal({{"ssm", graphed.to_double()}}, {{"ssm", direct.to_double()}},
                       "graph replay vs direct steps");
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  for (void* ptr : owned) cudaFree(ptr);
}

}  // namespace
}  // namespace mamba3::test
