// The cuda lane's tensor-core prefill forward (src/cuda/chunk_fwd_tc) runs on the CPU through
// tests/emu/emu.h (one host thread per CUDA thread, AddressSanitizer), launched as the lane
// launches it (fwd_tc_launch.cuh: eligibility, the sequence split, its workspace, the saving
// instance), against the float64 reference with the GPU tests' bar (kTcForwardTol on out and the
// ssm state, the recipe on the fp32 states; tests/cuda/test_cuda_lane.cpp). The saving instance
// must leave out and the final states bitwise unchanged, and the emulated backward reading its
// saved buffer must meet the tensor-core gradient bar (kTcGradTol). For developing the forward
// without a GPU; the GPU tests are the real check. MAMBA3_EMU_HASH=1 prints one hash line per
// case (out, final states, and for the saving cases the saved buffer and the gradients from it).
#define MAMBA3_CUDA_EMU 1
#include "emu.h"

// fwd_tc_kernel.cuh declares its dynamic shared memory `extern __shared__` without an emulation
// guard; compiled for the host that names these arrays, bound to its kernels (bind_fwd_smem).
namespace mamba3::cuda {
alignas(16) unsigned char tc_smem[m3emu::kMaxDynamicSmem];
alignas(16) double th_s[m3emu::kMaxDynamicSmem / sizeof(double)];
}  // namespace mamba3::cuda

// clang-format off
#include "cuda/chunk_fwd_tc/fwd_tc_launch.cuh"
// clang-format on

#include <gtest/gtest.h>

#include <algorithm>

#include "emu_lane.h"
#include "test_util.h"

namespace mamba3::test {
namespace {

template <int N, int P>
void bind_fwd_smem_np() {
  using cuda::fwd_tc_combine;
  using cuda::fwd_tc_kernel;
  using cuda::tc_smem;
  using cuda::th_s;
  m3emu::bind_dynamic_smem(fwd_tc_kernel<N, P, false>, tc_smem, sizeof tc_smem);
  m3emu::bind_dynamic_smem(fwd_tc_kernel<N, P, true>, tc_smem, sizeof tc_smem);
  m3emu::bind_dynamic_smem(fwd_tc_kernel<N, P, false, true>, tc_smem, sizeof tc_smem);
  m3emu::bind_dynamic_smem(fwd_tc_kernel<N, P, false, true, true>, tc_smem, sizeof tc_smem);
  m3emu::bind_dynamic_smem(fwd_tc_combine<N, P>, th_s, sizeof th_s);
}

void bind_fwd_smem() {
  bind_fwd_smem_np<64, 64>();
  bind_fwd_smem_np<64, 128>();
  bind_fwd_smem_np<128, 64>();
  bind_fwd_smem_np<128, 128>();
}

// The longest sequence (the lane reads it from cu_seqlens on the device, dispatch.cu).
int64_t max_seq_len(const check::Problem& p) {
  const auto& s = p.config().seqlens;
  return s.empty() ? p.config().L : *std::max_element(s.begin(), s.end());
}

struct EmuForward {
  Result r;                  // out and the final states, as run() names them
  std::vector<float> saved;  // the saved buffer (saving runs)
  int nseg = 0;              // segments of the sequence split (1: none)
  int sub = 0;               // the state pass's segments per output-pass segment
};

// The emulated tensor-core forward of `p` (out in `out_dtype`), as dispatch.cu launches it;
// `save`: with the saved buffer of saved_numel's size (the training instance). Fails the test
// unless the tensor-core forward serves the inputs.
EmuForward run_emu_forward(const check::Problem& p, DType out_dtype, bool save) {
  bind_fwd_smem();
  EmuForward e;
  check::HostTensor out = p.make_out(out_dtype);
  check::StateBuffers fs = p.make_states();
  // Lane::kCpu: validation of host tensors; the kernels run emulated.
  ForwardArgs f = forward_args(p, out, Lane::kCpu);
  f.final_states = fs.view();
  Dims d;
  Status st = validate_forward(f, &d);
  EXPECT_TRUE(st.ok()) << st.ToString();
  const cuda::CoreParams cp = cuda::make_params(f, d);
  const bool tc = cuda::fwd_tc::forward_uses_tensor_cores(f.in, d, cp);
  EXPECT_TRUE(tc) << "the tensor-core forward does not serve these inputs";
  if (!tc) return e;
  if (save) {
    cuda::SavedLayout l;
    st = emu::saved_layout_for(f.in, d, tc, &l);
    EXPECT_TRUE(st.ok()) << st.ToString();
    EXPECT_GT(l.bytes, 0) << "the tensor-core path should save";
    e.saved.assign(static_cast<size_t>(l.bytes / 4), -1.f);
    f.saved = make_tensor(e.saved.data(), DType::kF32, {static_cast<int64_t>(e.saved.size())});
  }
  const int64_t max_len = max_seq_len(p);
  cuda::SegParams sp;
  st = cuda::fwd_tc::choose_segments(d, max_len, &sp);
  EXPECT_TRUE(st.ok()) << st.ToString();
  e.nseg = sp.nseg;
  e.sub = sp.sub;
  cuda::SavedPtrs sv;
  st = cuda::fwd_tc::forward_saved_ptrs(f, d, &sv);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(sv.base != nullptr, save);
  if (d.S * d.H > 0) {  // as launch_forward (dispatch.cu)
    st = cuda::fwd_tc::launch_forward_tc(cp, d, max_len, sv, nullptr);
    EXPECT_TRUE(st.ok()) << st.ToString();
  }
  put(&e.r, "out", out);
  put_states(&e.r, fs);
  return e;
}

// Gradients of the emulated backward reading the forward's saved buffer (cotangents as run()
// draws them).
Result run_emu_backward_from_saved(const check::Problem& p, DType out_dtype,
                                   std::vector<float>& saved) {
  const RunOptions o;
  check::HostTensor dout = p.random_d_out(out_dtype, o.cot_seed);
  check::StateBuffers ds = p.random_d_states(o.cot_seed);
  check::GradBuffers g = p.make_grads(false);
  BackwardArgs b = backward_args(p.inputs(), dout, ds, g, Lane::kCpu, o.d_final);
  b.saved = make_tensor(saved.data(), DType::kF32, {static_cast<int64_t>(saved.size())});
  Dims d;
  Status st = validate_backward(b, &d);
  EXPECT_TRUE(st.ok()) << st.ToString();
  st = emu::backward_chunked(b, d);
  EXPECT_TRUE(st.ok()) << st.ToString();
  Result r;
  put_grads(&r, g);
  return r;
}

// The reference's and naive float32's forward outputs (and gradients with `backward`).
void references(const check::Problem& p, DType out_dtype, bool backward, Result* ref,
                Result* naive) {
  RunOptions o;
  o.backward = backward;
  o.out_dtype = out_dtype;
  *ref = run(p, Eval::kReference, o);
  *naive = run(p, Eval::kNaiveF32, o);
}

Result forward_only(const Result& r) {
  Result o;
  for (const auto& [name, v] : r)
    if (name.rfind("grad.", 0) != 0) o[name] = v;
  return o;
}

void print_errors(const Result& got, const Result& ref, const Result& naive) {
  for (const auto& [name, v] : got) {
    const bool circ = name == "final.angle";
    const double e = check::compare(name, v, ref.at(name), 1, circ).rel_l2;
    const double en = check::compare(name, naive.at(name), ref.at(name), 1, circ).rel_l2;
    std::printf("  %-22s rel_l2 %.3e  (naive f32 %.3e)\n", name.c_str(), e, en);
  }
}

// Out and every final state within the GPU tests' bar; `want_split`: the sequence split ran;
// `want_sub`: its state pass cut each segment into that many.
void check_forward(const Case& c, bool want_split, int want_sub = 1) {
  check::Problem p = make(c, 600 + c.L);
  Result ref, naive;
  references(p, c.dtype, false, &ref, &naive);
  const EmuForward got = run_emu_forward(p, c.dtype, false);
  if (got.r.empty()) return;
  if (want_split)
    EXPECT_GT(got.nseg, 1) << "the sequence split did not run";
  else
    EXPECT_EQ(got.nseg, 1) << "the sequence split ran";
  EXPECT_EQ(got.sub, want_sub) << "state-pass segments per segment";
  print_errors(got.r, ref, naive);
  expect_tc_forward_within_bar(got.r, ref, naive, p.config().describe());
  if (std::getenv("MAMBA3_EMU_HASH")) print_hashes(got.r, p.config().describe());
  if (std::getenv("MAMBA3_EMU_DETERMINISM"))
    expect_bitwise_equal(got.r, run_emu_forward(p, c.dtype, false).r, "two emulated forwards");
}

class EmuForwardTc : public testing::TestWithParam<Case> {};

TEST_P(EmuForwardTc, WithinBf16Bar) {
  ScopedEnv seg("MAMBA3_CUDA_SEG_LEN", nullptr);
  check_forward(GetParam(), false);
}

// D, Z and a bias on every case (check::default_config); states: the initial states.
INSTANTIATE_TEST_SUITE_P(
    Bf16, EmuForwardTc,
    testing::Values(
        Case{"tc_siso_n128_L100", 1, 100, 2, 1, 128, 64, 1, 32, true, false, false, {}, kI, kB},
        Case{"tc_mimo_r4_halved_norm", 1, 40, 2, 1, 64, 64, 4, 16, true, true, true, {}, kH, kB},
        Case{"tc_mimo_r2_per_rank", 1, 50, 2, 1, 64, 64, 2, 16, true, false, false, {}, kI, kB},
        Case{"tc_siso_gqa_norm", 1, 70, 4, 2, 64, 64, 1, 16, true, true, false, {}, kH, kB},
        Case{"tc_varlen", 1, 150, 2, 1, 64, 64, 1, 16, true, false, false, {70, 0, 1, 64, 15}, kI,
             kB},
        Case{"tc_n64_p128_halved", 1, 70, 2, 1, 64, 128, 1, 32, true, true, false, {}, kH, kB},
        Case{"tc_n128_p128_na64", 1, 65, 1, 1, 128, 128, 1, 64, true, false, false, {}, kI, kB},
        // NA not a multiple of 4: the angle tiles take the out-of-line 4-byte copy.
        Case{"tc_siso_na6", 1, 40, 2, 1, 64, 64, 1, 6, true, false, false, {}, kI, kB},
        Case{"tc_mimo_r8_gqa", 1, 20, 4, 2, 64, 64, 8, 16, true, true, true, {}, kH, kB},
        Case{"tc_L1_nostates", 2, 1, 2, 1, 64, 64, 1, 16, false, false, false, {}, kI, kB}),
    [](const testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

// The sequence split forced onto 64-token segments (MAMBA3_CUDA_SEG_LEN=64): the segment-state
// pass, fwd_tc_combine and the output pass from the combined start states.
class EmuForwardTcSplit : public testing::TestWithParam<Case> {};

TEST_P(EmuForwardTcSplit, WithinBf16Bar) {
  ScopedEnv seg("MAMBA3_CUDA_SEG_LEN", "64");
  ScopedEnv sub("MAMBA3_CUDA_SEG_SUB", nullptr);  // short segments: the state pass as cut
  check_forward(GetParam(), true);
}

// The state pass cutting finer than the output pass (MAMBA3_CUDA_SEG_SUB=2: 64-token state
// segments, 128-token output segments that start at every second one).
TEST_P(EmuForwardTcSplit, StatePassCutFinerWithinBf16Bar) {
  ScopedEnv seg("MAMBA3_CUDA_SEG_LEN", "128");
  ScopedEnv sub("MAMBA3_CUDA_SEG_SUB", "2");
  check_forward(GetParam(), true, 2);
}

INSTANTIATE_TEST_SUITE_P(
    Bf16, EmuForwardTcSplit,
    testing::Values(
        Case{"split_siso_norm", 1, 200, 2, 1, 128, 64, 1, 32, true, true, false, {}, kI, kB},
        Case{"split_halved_nostates", 1, 150, 1, 1, 64, 64, 1, 16, false, false, false, {}, kH,
             kB},
        // Packed MIMO with an empty sequence and one that fits one segment.
        Case{"split_mimo_r4_varlen", 1, 300, 2, 1, 64, 64, 4, 16, true, true, true,
             {100, 0, 137, 63}, kH, kB}),
    [](const testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

// The split the lane picks unforced, at the named shapes on an H200's 132 SMs (the emulation's
// sm_count): none where (sequences x heads) fill the 264 CTA slots; at `megacpp` 2 segments and
// a state pass cut in 2 (256 CTAs: one wave); at `long` 4 segments, state pass uncut (192 CTAs).
TEST(EmuForwardTcSplitPolicy, ChoosesSegmentsAndStateCut) {
  ScopedEnv seg("MAMBA3_CUDA_SEG_LEN", nullptr);
  ScopedEnv sub("MAMBA3_CUDA_SEG_SUB", nullptr);
  struct Want {
    const char* name;
    int64_t S, L, H;
    int nseg, seg_len, sub;
  };
  for (const Want& w :
       {Want{"train", 4, 4096, 64, 1, 0, 1}, Want{"wide", 8, 8192, 32, 1, 0, 1},
        Want{"megacpp", 8, 8192, 16, 2, 4096, 2}, Want{"long", 1, 65536, 64, 4, 16384, 1},
        Want{"short_long", 1, 1500, 1, 2, 1024, 2}}) {
    Dims d;
    d.S = d.B = w.S, d.L = w.L, d.H = w.H;
    cuda::SegParams sp;
    ASSERT_TRUE(cuda::fwd_tc::choose_segments(d, w.L, &sp).ok()) << w.name;
    EXPECT_EQ(sp.nseg, w.nseg) << w.name;
    EXPECT_EQ(sp.seg_len, w.seg_len) << w.name;
    EXPECT_EQ(sp.sub, w.sub) << w.name;
  }
  // Forced: the state pass cut as asked, and the segments a multiple of 64 x sub tokens.
  ScopedEnv sub3("MAMBA3_CUDA_SEG_SUB", "3");
  Dims d;
  d.S = d.B = 8, d.L = 8192, d.H = 16;
  cuda::SegParams sp;
  ASSERT_TRUE(cuda::fwd_tc::choose_segments(d, d.L, &sp).ok());
  EXPECT_EQ(sp.sub, 3);
  EXPECT_EQ(sp.seg_len % (64 * 3), 0);
  EXPECT_EQ(sp.nseg, 2);
}

TEST(EmuForwardTcSplitGate, BadSegmentLengthNamed) {
  const Case c{"seg_bad", 1, 70, 1, 1, 64, 64, 1, 16, true, false, false, {}, kI, kB};
  check::Problem p = make(c, 5);
  check::HostTensor out = p.make_out(DType::kBF16);
  const ForwardArgs f = forward_args(p, out, Lane::kCpu);
  Dims d;
  ASSERT_TRUE(validate_forward(f, &d).ok());
  ScopedEnv seg("MAMBA3_CUDA_SEG_LEN", "100");
  const Status st =
      cuda::fwd_tc::launch_forward_tc(cuda::make_params(f, d), d, d.L, cuda::SavedPtrs{}, nullptr);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  EXPECT_NE(st.message().find("MAMBA3_CUDA_SEG_LEN"), std::string::npos) << st.message();
  // A state-pass cut that is not a positive integer, or that leaves state segments of a length
  // not a multiple of 64: named.
  for (const auto& [len, sub] : {std::pair<const char*, const char*>{"128", "x"},
                                 {"128", "0"},
                                 {"128", "3"},
                                 {nullptr, "-2"}}) {
    ScopedEnv seg2("MAMBA3_CUDA_SEG_LEN", len);
    ScopedEnv sub2("MAMBA3_CUDA_SEG_SUB", sub);
    const Status s2 = cuda::fwd_tc::launch_forward_tc(cuda::make_params(f, d), d, d.L,
                                                      cuda::SavedPtrs{}, nullptr);
    EXPECT_EQ(s2.code(), StatusCode::kInvalidArgument) << s2.ToString();
    EXPECT_NE(s2.message().find("MAMBA3_CUDA_SEG_SUB"), std::string::npos) << s2.message();
  }
}

// The tensor-core forward addresses a chunk's rows with 32-bit offsets from a 64-bit chunk base
// (make_params): q with a token stride of 2^24 elements or more must route off the tensor cores
// (to the fp32 SIMT kernel), one just below must not. Only the routing is checked here (the
// buffers are 32 MB of bf16 holding q's values at that stride).
TEST(EmuForwardRouting, StridesOf2To24LeaveTheTensorCores) {
  const Case c{"route_stride", 1, 2, 1, 1, 64, 64, 1, 16, false, false, false, {}, kI, kB};
  check::Problem p = make(c, 6);
  check::HostTensor out = p.make_out(DType::kBF16);
  for (const int64_t stride : {(int64_t{1} << 24) - 64, int64_t{1} << 24}) {
    ForwardArgs f = forward_args(p, out, Lane::kCpu);
    const Tensor& q = f.in.q;  // (B, L, G, N) = (1, 2, 1, 64), contiguous
    ASSERT_EQ(q.ndim, 4);
    std::vector<uint16_t> buf(static_cast<size_t>(stride + 64));
    for (int64_t t = 0; t < 2; ++t)
      std::memcpy(buf.data() + t * stride, static_cast<const uint16_t*>(q.data) + t * q.strides[1],
                  64 * sizeof(uint16_t));
    f.in.q = make_strided(buf.data(), DType::kBF16, {1, 2, 1, 64}, {2 * stride, stride, 64, 1});
    Dims d;
    ASSERT_TRUE(validate_forward(f, &d).ok());
    const bool tc = cuda::fwd_tc::forward_uses_tensor_cores(f.in, d, cuda::make_params(f, d));
    EXPECT_EQ(tc, stride < (int64_t{1} << 24)) << "q token stride " << stride;
  }
}

// The saving instance (training; kSave): out and the final states bitwise those of the forward
// that saves nothing and within the bar; the emulated backward reading the saved buffer within
// the tensor-core gradient bar (kTcGradTol, or the recipe where naive float32 misses it), as
// CudaBackward.SavedTilesTrainingMode on the GPU.
struct SavedCase {
  Case c;
  const char* seg_len;  // MAMBA3_CUDA_SEG_LEN (null: unset)
};

class EmuForwardTcSaved : public testing::TestWithParam<SavedCase> {};

TEST_P(EmuForwardTcSaved, BitwiseUnchangedAndBackwardWithinBar) {
  const SavedCase& sc = GetParam();
  const Case& c = sc.c;
  ScopedEnv seg("MAMBA3_CUDA_SEG_LEN", sc.seg_len);
  ScopedEnv save("MAMBA3_CUDA_SAVE_TILES", nullptr);
  ScopedEnv mimo_tc("MAMBA3_CUDA_BWD_MIMO_TC", nullptr);
  check::Problem p = make(c, 600 + c.L);
  Result ref, naive;
  references(p, c.dtype, true, &ref, &naive);
  const EmuForward plain = run_emu_forward(p, c.dtype, false);
  EmuForward saved = run_emu_forward(p, c.dtype, true);
  if (saved.r.empty()) return;
  EXPECT_EQ(saved.nseg > 1, sc.seg_len != nullptr);
  expect_bitwise_equal(saved.r, plain.r, "forward outputs with and without saving");
  const Result ref_f = forward_only(ref), naive_f = forward_only(naive);
  expect_tc_forward_within_bar(saved.r, ref_f, naive_f, p.config().describe() + " (saving)");
  const Result grads = run_emu_backward_from_saved(p, c.dtype, saved.saved);
  const Result ref_g = grads_only(ref), naive_g = grads_only(naive);
  print_errors(grads, ref_g, naive_g);
  expect_within_bar_or_recipe(grads, ref_g, naive_g, kTcGradTol,
                              p.config().describe() + " (backward from the saved buffer)");
  if (std::getenv("MAMBA3_EMU_HASH")) {
    Result all = saved.r;
    all.insert(grads.begin(), grads.end());
    print_hashes(all, p.config().describe() + " saving",
                 {{"saved", fnv1a(saved.saved.data(), saved.saved.size() * sizeof(float))}});
  }
}

INSTANTIATE_TEST_SUITE_P(
    Bf16, EmuForwardTcSaved,
    testing::Values(
        SavedCase{{"saved_siso", 1, 100, 2, 1, 128, 64, 1, 32, true, false, false, {}, kI, kB},
                  nullptr},
        SavedCase{{"saved_mimo_r4_gqa_norm", 1, 40, 4, 2, 64, 64, 4, 16, true, true, true, {}, kH,
                   kB},
                  nullptr},
        SavedCase{{"saved_varlen_norm", 1, 150, 2, 1, 64, 64, 1, 16, true, true, false,
                   {70, 0, 1, 64, 15}, kI, kB},
                  nullptr},
        SavedCase{{"saved_split_mimo_varlen", 1, 200, 2, 1, 64, 64, 2, 16, true, false, true,
                   {100, 0, 37, 63}, kI, kB},
                  "64"}),
    [](const testing::TestParamInfo<SavedCase>& i) { return std::string(i.param.c.name); });

// MAMBA3_CUDA_SAVE_Y=0: the saved buffer without y (smaller by 64 x P fp32 per cell, up to the
// region's alignment); the emulated backward recomputes y in chunk_out and stays within the bar,
// as CudaBackward.SaveYGate on the GPU. With y (the default) EmuForwardTcSaved covers it.
TEST(EmuSaveY, OffRecomputesYWithinBar) {
  ScopedEnv save("MAMBA3_CUDA_SAVE_TILES", nullptr);
  ScopedEnv mimo_tc("MAMBA3_CUDA_BWD_MIMO_TC", nullptr);
  const Case c{"no_y_mimo_r4", 1, 40, 2, 1, 64, 64, 4, 16, true, true, true, {}, kI, kB};
  check::Problem p = make(c, 700 + c.L);
  Result ref, naive;
  references(p, c.dtype, true, &ref, &naive);
  const EmuForward with_y = run_emu_forward(p, c.dtype, true);
  if (with_y.r.empty()) return;
  ScopedEnv off("MAMBA3_CUDA_SAVE_Y", "0");
  EmuForward no_y = run_emu_forward(p, c.dtype, true);
  expect_bitwise_equal(no_y.r, with_y.r, "forward outputs with and without y saved");
  const int64_t cells = c.B * ((c.L + 64 / c.R - 1) / (64 / c.R)) * c.H;
  const int64_t less = static_cast<int64_t>(with_y.saved.size() - no_y.saved.size());
  EXPECT_GE(less, cells * 64 * c.P);
  EXPECT_LE(less, cells * 64 * c.P + 64);
  const Result grads = run_emu_backward_from_saved(p, c.dtype, no_y.saved);
  const Result ref_g = grads_only(ref), naive_g = grads_only(naive);
  print_errors(grads, ref_g, naive_g);
  expect_within_bar_or_recipe(grads, ref_g, naive_g, kTcGradTol,
                              p.config().describe() + " (backward from a saved buffer without y)");
  if (std::getenv("MAMBA3_EMU_HASH")) print_hashes(grads, p.config().describe() + " without y");
}

// The PsiV cache (MAMBA3_PSIV_CACHE=1): the saved records carry v psi and the emulated backward
// copies it back; with 0 the backward computes it again from the raw v. The same bits
// either way (forward outputs and gradients), MIMO with psi and SISO; the buffer with the cache
// is larger by rows x P bf16 per cell. CudaBackward.PsivCacheGate runs the same on the GPU.
TEST(EmuPsivCache, SameBitsOnAndOff) {
  ScopedEnv save("MAMBA3_CUDA_SAVE_TILES", nullptr);
  ScopedEnv mimo_tc("MAMBA3_CUDA_BWD_MIMO_TC", nullptr);
  for (const Case& c :
       {Case{"psiv_mimo_r4", 1, 40, 2, 1, 64, 64, 4, 16, true, false, true, {}, kI, kB},
        Case{"psiv_siso", 1, 70, 2, 1, 64, 64, 1, 16, false, false, false, {}, kH, kB}}) {
    SCOPED_TRACE(c.name);
    check::Problem p = make(c, 800 + c.L);
    EmuForward f_off, f_on;
    Result g_off, g_on;
    {
      ScopedEnv off("MAMBA3_PSIV_CACHE", "0");
      f_off = run_emu_forward(p, c.dtype, true);
      if (f_off.r.empty()) return;
      g_off = run_emu_backward_from_saved(p, c.dtype, f_off.saved);
    }
    {
      ScopedEnv on("MAMBA3_PSIV_CACHE", "1");
      f_on = run_emu_forward(p, c.dtype, true);
      if (f_on.r.empty()) return;
      g_on = run_emu_backward_from_saved(p, c.dtype, f_on.saved);
    }
    const int64_t cells = c.B * ((c.L + 64 / c.R - 1) / (64 / c.R)) * c.H;
    EXPECT_GE(static_cast<int64_t>(f_on.saved.size() - f_off.saved.size()) * 4,
              cells * 64 * c.P * 2);
    expect_bitwise_equal(f_on.r, f_off.r, "forward outputs, cache on vs off");
    expect_bitwise_equal(g_on, g_off, "gradients from the saved buffer, cache on vs off");
  }
}

}  // namespace
}  // namespace mamba3::test
