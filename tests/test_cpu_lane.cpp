// The cpu lane against the float64 reference on fresh random problems: the CONVENTIONS matrix
// (awkward lengths, ranks, states, packed sequences, non-contiguous inputs, bf16), bitwise
// determinism, and decode steps == prefill.
#include <gtest/gtest.h>

#include <cstring>

#include "test_util.h"

namespace mamba3::test {
namespace {

std::string case_name(const testing::TestParamInfo<Case>& info) { return info.param.name; }

class CpuVsReference : public testing::TestWithParam<Case> {};

TEST_P(CpuVsReference, ForwardBackwardWithinRecipe) {
  const Case& c = GetParam();
  check::Problem p = make(c, 1000 + c.L);
  RunOptions o;
  o.out_dtype = c.dtype;
  Result ref = run(p, Eval::kReference, o);
  Result naive = run(p, Eval::kNaiveF32, o);
  Result cpu = run(p, Eval::kCpu, o);
  expect_within_recipe(cpu, ref, naive, p.config().describe());
}

INSTANTIATE_TEST_SUITE_P(
    Matrix, CpuVsReference,
    testing::Values(
        // Lengths around the chunk size (64) and odd primes.
        Case{"siso_L1", 2, 1, 2, 1, 16, 8, 1, 4, true, false, false, {}, kI, kF},
        Case{"siso_L2", 1, 2, 2, 1, 16, 8, 1, 4, false, false, false, {}, kI, kF},
        Case{"siso_L63", 1, 63, 2, 1, 32, 16, 1, 8, true, false, false, {}, kI, kF},
        Case{"siso_L64", 1, 64, 2, 2, 32, 16, 1, 8, false, false, false, {}, kI, kF},
        Case{"siso_L65", 2, 65, 4, 2, 32, 16, 1, 16, true, false, false, {}, kI, kF},
        Case{"siso_L97_halved", 1, 97, 2, 1, 32, 16, 1, 8, true, false, false, {}, kH, kF},
        Case{"siso_L331_norm", 1, 331, 2, 1, 32, 16, 1, 8, true, true, false, {}, kI, kF},
        Case{"siso_L0", 2, 0, 2, 1, 16, 8, 1, 4, true, false, false, {}, kI, kF},
        Case{"siso_no_rope", 1, 70, 2, 1, 16, 8, 1, 0, true, false, false, {}, kI, kF},
        // MIMO: per-rank output, phi reduction, fused norm, GQA.
        Case{"mimo_r2_L67", 1, 67, 2, 1, 32, 16, 2, 8, true, false, true, {}, kH, kF},
        Case{"mimo_r4_L130_gqa", 2, 130, 4, 2, 32, 16, 4, 16, true, true, true, {}, kI, kF},
        Case{"mimo_r4_per_rank", 1, 45, 2, 1, 16, 8, 4, 4, false, false, false, {}, kH, kF},
        Case{"mimo_r8_L33", 1, 33, 2, 1, 16, 8, 8, 8, true, false, true, {}, kH, kF},
        // Packed sequences, including empty ones.
        Case{"varlen_siso", 1, 150, 2, 1, 32, 16, 1, 8, true, false, false, {70, 0, 1, 64, 15},
             kI, kF},
        Case{"varlen_mimo_empty_first", 1, 66, 2, 1, 16, 8, 2, 4, true, true, true, {0, 66, 0},
             kH, kF},
        // bfloat16 activations (out and activation gradients rounded to bfloat16).
        Case{"bf16_siso_L100", 1, 100, 2, 1, 32, 16, 1, 8, true, false, false, {}, kI,
             DType::kBF16},
        Case{"bf16_mimo_L80", 1, 80, 2, 1, 32, 16, 4, 8, true, true, true, {}, kH,
             DType::kBF16},
        // float16 activations.
        Case{"f16_siso_L90", 2, 90, 2, 1, 32, 16, 1, 8, true, true, false, {}, kI, DType::kF16},
        Case{"f16_mimo_L70", 1, 70, 2, 1, 32, 16, 2, 8, true, false, true, {}, kH,
             DType::kF16}),
    case_name);

TEST(CpuLane, BitwiseDeterministicAcrossRunsAndThreadCounts) {
  Case c{"det", 2, 150, 4, 2, 32, 16, 2, 8, true, true, true, {}, kH, kF};
  check::Problem p = make(c, 77);
  RunOptions o;
  o.threads = 2;
  Result a = run(p, Eval::kCpu, o);
  Result b = run(p, Eval::kCpu, o);
  o.threads = 1;
  Result one = run(p, Eval::kCpu, o);
  o.threads = 3;
  Result three = run(p, Eval::kCpu, o);
  expect_bitwise_equal(a, b, "two runs");
  expect_bitwise_equal(a, one, "2 threads vs 1");
  expect_bitwise_equal(a, three, "2 threads vs 3");
}

// The backward from ForwardArgs::saved gives bitwise the gradients of the recomputing one.
TEST(CpuLane, SavedActivationsMatchRecompute) {
  for (int64_t R : {1, 4}) {
    Case c{"saved", 1, 150, 4, 2, 32, 16, R, 8, true, R > 1, true, {60, 0, 90}, kH, kF};
    check::Problem p = make(c, 41);
    RunOptions o;
    Result plain = run(p, Eval::kCpu, o);
    o.use_saved = true;
    Result saved = run(p, Eval::kCpu, o);
    expect_bitwise_equal(saved, plain, "saved vs recompute, R=" + std::to_string(R));
  }
}

TEST(CpuLane, SavedBufferIsChecked) {
  Case c{"saved_bad", 1, 70, 2, 1, 16, 8, 1, 4, true, false, false, {}, kI, kF};
  check::Problem p = make(c, 3);
  check::HostTensor out = p.make_out(DType::kF32);
  ForwardArgs f = forward_args(p, out, Lane::kCpu);
  int64_t n = 0;
  ASSERT_TRUE(saved_numel(f, &n).ok());
  EXPECT_GT(n, 16);
  std::vector<float> buf(n + 1);
  f.saved = make_tensor(buf.data(), DType::kF32, {n + 1});
  Status st = forward(f);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("saved"), std::string::npos) << st.message();
  f.saved = make_tensor(buf.data(), DType::kF32, {n});
  ASSERT_TRUE(forward(f).ok());
  // A backward with a different chunk size cannot use this buffer.
  check::HostTensor dout = p.random_d_out(DType::kF32, 1);
  check::GradBuffers g = p.make_grads(false);
  BackwardArgs b;
  b.in = f.in;
  b.in.chunk_size = 32;
  b.d_out = dout.view();
  b.grads = g.view();
  b.lane = Lane::kCpu;
  int64_t n32 = 0;
  ForwardArgs f32 = f;
  f32.in.chunk_size = 32;
  ASSERT_TRUE(saved_numel(f32, &n32).ok());
  b.saved = make_tensor(buf.data(), DType::kF32, {n32});
  st = backward(b);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("saved"), std::string::npos) << st.message();
}

TEST(CpuLane, ChunkSizeDoesNotChangeResultsBeyondRounding) {
  Case c{"chunks", 1, 200, 2, 1, 32, 16, 2, 8, true, false, true, {}, kI, kF};
  check::Problem p = make(c, 5);
  RunOptions o;
  Result ref = run(p, Eval::kReference, o);
  Result naive = run(p, Eval::kNaiveF32, o);
  for (int chunk : {1, 7, 16, 64, 256}) {
    o.chunk_size = chunk;
    expect_within_recipe(run(p, Eval::kCpu, o), ref, naive, "chunk " + std::to_string(chunk));
  }
}

// Non-contiguous views of the same values give bitwise the same results.
TEST(CpuLane, NonContiguousInputsMatchContiguous) {
  Case c{"strided", 2, 70, 4, 2, 32, 16, 2, 8, true, true, true, {}, kH, kF};
  check::Problem p = make(c, 9);
  const auto& cf = p.config();
  RunOptions o;
  Result want = run(p, Eval::kCpu, o);

  // q and k live in a buffer with the group and rank axes swapped and padding on N;
  // v is stored (B, H, L, P) and viewed as (B, L, H, P); adt is stored (H, B, L).
  std::vector<float> qbuf(cf.B * cf.L * cf.G * cf.R * (cf.N + 3)), kbuf(qbuf.size());
  std::vector<float> vbuf(cf.B * cf.H * cf.L * cf.P), abuf(cf.H * cf.B * cf.L);
  const int64_t NP = cf.N + 3;
  for (int64_t b = 0; b < cf.B; ++b)
    for (int64_t l = 0; l < cf.L; ++l)
      for (int64_t r = 0; r < cf.R; ++r)
        for (int64_t g = 0; g < cf.G; ++g)
          for (int64_t n = 0; n < cf.N; ++n) {
            const int64_t src = (((b * cf.L + l) * cf.R + r) * cf.G + g) * cf.N + n;
            const int64_t dst = (((b * cf.L + l) * cf.G + g) * cf.R + r) * NP + n;
            qbuf[dst] = static_cast<float>(p.q.get(src));
            kbuf[dst] = static_cast<float>(p.k.get(src));
          }
  for (int64_t b = 0; b < cf.B; ++b)
    for (int64_t l = 0; l < cf.L; ++l)
      for (int64_t h = 0; h < cf.H; ++h)
        for (int64_t x = 0; x < cf.P; ++x)
          vbuf[((b * cf.H + h) * cf.L + l) * cf.P + x] =
              static_cast<float>(p.v.get(((b * cf.L + l) * cf.H + h) * cf.P + x));
  for (int64_t b = 0; b < cf.B; ++b)
    for (int64_t h = 0; h < cf.H; ++h)
      for (int64_t l = 0; l < cf.L; ++l)
        abuf[(h * cf.B + b) * cf.L + l] = static_cast<float>(p.adt.get((b * cf.H + h) * cf.L + l));

  const std::vector<int64_t> qshape{cf.B, cf.L, cf.R, cf.G, cf.N};
  const std::vector<int64_t> qstr{cf.L * cf.G * cf.R * NP, cf.G * cf.R * NP, NP, cf.R * NP, 1};
  auto run_strided = [&](Eval ev) {
    check::HostTensor out = p.make_out(DType::kF32);
    check::StateBuffers fs = p.make_states();
    ForwardArgs f;
    f.in = p.inputs();
    f.in.q = make_strided(qbuf.data(), DType::kF32, qshape, qstr);
    f.in.k = make_strided(kbuf.data(), DType::kF32, qshape, qstr);
    f.in.v = make_strided(vbuf.data(), DType::kF32, {cf.B, cf.L, cf.H, cf.P},
                          {cf.H * cf.L * cf.P, cf.P, cf.L * cf.P, 1});
    f.in.adt = make_strided(abuf.data(), DType::kF32, {cf.B, cf.H, cf.L},
                            {cf.L, cf.B * cf.L, 1});
    f.out = out.view();
    f.final_states = fs.view();
    f.lane = Lane::kCpu;
    EXPECT_TRUE(run_eval(ev, f).ok());
    check::HostTensor dout = p.random_d_out(DType::kF32, o.cot_seed);
    check::StateBuffers ds = p.random_d_states(o.cot_seed);
    // Gradients written through strided views too: grad q in the padded layout.
    std::vector<float> gq(qbuf.size(), -1.f);
    check::GradBuffers g = p.make_grads(false);
    BackwardArgs bw;
    bw.in = f.in;
    bw.d_out = dout.view();
    bw.d_final = ds.view();
    bw.grads = g.view();
    bw.grads.q = make_strided(gq.data(), DType::kF32, qshape, qstr);
    bw.lane = Lane::kCpu;
    EXPECT_TRUE(run_eval(ev, bw).ok());
    Result r;
    put(&r, "out", out);
    put(&r, "final.ssm", fs.ssm);
    put(&r, "grad.k", g.k);
    put(&r, "grad.v", g.v);
    put(&r, "grad.adt", g.adt);
    std::vector<double> gqv;
    for (int64_t b = 0; b < cf.B; ++b)
      for (int64_t l = 0; l < cf.L; ++l)
        for (int64_t r2 = 0; r2 < cf.R; ++r2)
          for (int64_t gg = 0; gg < cf.G; ++gg)
            for (int64_t n = 0; n < cf.N; ++n)
              gqv.push_back(gq[(((b * cf.L + l) * cf.G + gg) * cf.R + r2) * NP + n]);
    r["grad.q"] = gqv;
    // Padding untouched.
    for (size_t i = 0; i < gq.size(); ++i)
      if (static_cast<int64_t>(i % NP) >= cf.N) {
        EXPECT_EQ(gq[i], -1.f) << "padding written at " << i;
      }
    return r;
  };
  Result got = run_strided(Eval::kCpu);
  Result want_sub;
  for (const char* k : {"out", "final.ssm", "grad.k", "grad.v", "grad.adt", "grad.q"})
    want_sub[k] = want.at(k);
  expect_bitwise_equal(got, want_sub, "strided vs contiguous");
  // And the reference lane reads the same strided views.
  Result ref_strided = run_strided(Eval::kReference);
  Result ref = run(p, Eval::kReference, o);
  Result ref_sub;
  for (const char* k : {"out", "final.ssm", "grad.k", "grad.v", "grad.adt", "grad.q"})
    ref_sub[k] = ref.at(k);
  expect_close(ref_strided, ref_sub, 1e-6, "reference strided (float32 buffers) vs contiguous");
}

}  // namespace
}  // namespace mamba3::test
