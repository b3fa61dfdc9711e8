// Bad input gets a Status naming the argument; valid corner cases (L = 0, empty packed
// sequences) run; the PsiV gate fails closed.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <sstream>
#include <string>

#include "test_util.h"

namespace mamba3::test {
namespace {

struct Fixture {
  check::Problem p;
  check::HostTensor out;
  check::StateBuffers fs;
  ForwardArgs f;
  explicit Fixture(check::ProblemConfig c) : p(c) {
    out = p.make_out(DType::kF32);
    fs = p.make_states();
    f.in = p.inputs();
    f.out = out.view();
    f.final_states = fs.view();
    f.lane = Lane::kCpu;
  }
};

check::ProblemConfig base(int64_t R = 2) {
  check::ProblemConfig c = check::default_config(2, 10, 4, 2, 8, 4, R, 3);
  c.NA = 2;
  c.has_states = true;
  return c;
}

// The status is an error of `code` whose message contains every fragment.
void expect_error(const Status& st, StatusCode code, std::initializer_list<const char*> frags) {
  ASSERT_FALSE(st.ok()) << "expected an error mentioning " << *frags.begin();
  EXPECT_EQ(st.code(), code) << st.ToString();
  for (const char* f : frags) EXPECT_NE(st.message().find(f), std::string::npos)
      << "message '" << st.message() << "' lacks '" << f << "'";
}

TEST(Validation, ValidProblemPassesOnEveryLaneAndAuto) {
  Fixture x(base());
  for (Lane lane : {Lane::kAuto, Lane::kReference, Lane::kCpu}) {
    x.f.lane = lane;
    EXPECT_TRUE(validate(x.f).ok());
    Status st = forward(x.f);
    EXPECT_TRUE(st.ok()) << lane_name(lane) << ": " << st.ToString();
  }
}

TEST(Validation, ShapesDtypesAndDevices) {
  Fixture x(base());
  ForwardArgs f = x.f;
  std::vector<float> buf(4096);
  f.in.q = make_tensor(buf.data(), DType::kF32, {2, 10, 2, 2, 7});
  expect_error(validate(f), StatusCode::kInvalidArgument, {"q", "even"});
  f = x.f;
  f.in.k = make_tensor(buf.data(), DType::kF32, {2, 10, 2, 2, 6});
  expect_error(validate(f), StatusCode::kInvalidArgument, {"k", "expected shape (2, 10, 2, 2, 8)", "(2, 10, 2, 2, 6)"});
  f = x.f;
  f.in.adt.dtype = DType::kBF16;
  expect_error(validate(f), StatusCode::kInvalidArgument, {"adt", "dtype", "bfloat16"});
  f = x.f;
  f.in.v.dtype = DType::kI32;
  expect_error(validate(f), StatusCode::kInvalidArgument, {"v", "dtype", "int32"});
  f = x.f;
  f.in.z.device = Device::kCUDA;
  expect_error(validate(f), StatusCode::kInvalidArgument, {"z", "device"});
  f = x.f;
  f.in.dt.data = nullptr;
  expect_error(validate(f), StatusCode::kInvalidArgument, {"dt", "null"});
  f = x.f;
  f.out = make_tensor(buf.data(), DType::kF32, {2, 10, 4, 5});
  expect_error(validate(f), StatusCode::kInvalidArgument, {"out", "expected shape (2, 10, 4, 4)"});
  f = x.f;
  f.in.v.strides[1] = -f.in.v.strides[1];
  expect_error(validate(f), StatusCode::kInvalidArgument, {"v", "negative stride"});
  f = x.f;
  f.in.trap = Tensor{};
  expect_error(validate(f), StatusCode::kInvalidArgument, {"trap", "required"});
  f = x.f;
  f.lane = Lane::kCuda;
  expect_error(validate(f), StatusCode::kInvalidArgument, {"lane", "cuda"});
}

TEST(Validation, HeadsGroupsRopeAndRank) {
  {
    check::ProblemConfig c = base();
    c.G = 3;
    c.H = 4;
    Fixture x(c);
    expect_error(validate(x.f), StatusCode::kInvalidArgument, {"H = 4", "G = 3"});
  }
  {
    check::ProblemConfig c = base();
    c.NA = 5;  // N / 2 = 4
    Fixture x(c);
    expect_error(validate(x.f), StatusCode::kInvalidArgument, {"angles", "NA = 5", "N/2 = 4"});
  }
  {
    Fixture x(base(2));
    std::vector<float> b(4 * 4 * 8);
    x.f.in.q_bias = make_tensor(b.data(), DType::kF32, {4, 4, 8});  // R = 4 vs q's R = 2
    expect_error(validate(x.f), StatusCode::kInvalidArgument, {"q_bias", "(4, 2, 8)"});
    x.f.in.q_bias = x.p.q_bias.view();
    x.f.in.mimo_v = make_tensor(b.data(), DType::kF32, {4, 3, 4});
    expect_error(validate(x.f), StatusCode::kInvalidArgument, {"mimo_v", "(4, 2, 4)"});
  }
}

TEST(Validation, StatesAllOrNone) {
  Fixture x(base());
  ForwardArgs f = x.f;
  f.in.initial.k = Tensor{};
  expect_error(validate(f), StatusCode::kInvalidArgument, {"initial", "all four", "k absent"});
  f = x.f;
  f.final_states.v = Tensor{};
  expect_error(validate(f), StatusCode::kInvalidArgument, {"final_states", "all four"});
  f = x.f;
  std::vector<float> b(1024);
  f.in.initial.ssm = make_tensor(b.data(), DType::kF32, {2, 4, 8, 4});
  expect_error(validate(f), StatusCode::kInvalidArgument, {"initial.ssm", "(2, 4, 4, 8)"});
}

TEST(Validation, CuSeqlens) {
  check::ProblemConfig c = base();
  c.B = 1;
  c.seqlens = {4, 6};
  Fixture x(c);
  ASSERT_TRUE(validate(x.f).ok());
  auto with = [&](std::vector<int32_t> cu) {
    static std::vector<int32_t> keep;
    keep = cu;
    ForwardArgs f = x.f;
    f.in.cu_seqlens = make_tensor(keep.data(), DType::kI32, {static_cast<int64_t>(keep.size())});
    return validate(f);
  };
  expect_error(with({1, 4, 10}), StatusCode::kInvalidArgument, {"cu_seqlens", "start at 0"});
  expect_error(with({0, 6, 4, 10}), StatusCode::kInvalidArgument, {"cu_seqlens", "non-decreasing"});
  expect_error(with({0, 4, 9}), StatusCode::kInvalidArgument, {"cu_seqlens", "end at L = 10"});
  // Wrong S for the given initial states.
  expect_error(with({0, 4, 5, 10}), StatusCode::kInvalidArgument, {"initial.angle"});
  // B != 1.
  Fixture y(base());
  std::vector<int32_t> cu{0, 10};
  ForwardArgs f = y.f;
  f.in.cu_seqlens = make_tensor(cu.data(), DType::kI32, {2});
  expect_error(validate(f), StatusCode::kInvalidArgument, {"cu_seqlens", "B == 1", "B = 2"});
  cu = {0, 10};
  f = x.f;
  std::vector<float> fcu{0, 10};
  f.in.cu_seqlens = make_tensor(fcu.data(), DType::kF32, {2});
  expect_error(validate(f), StatusCode::kInvalidArgument, {"cu_seqlens", "int32"});
}

TEST(Validation, NonFiniteSteeringValues) {
  Fixture x(base());
  x.p.adt.set(7, std::nan(""));
  expect_error(forward(x.f), StatusCode::kInvalidArgument, {"adt", "non-finite", "(0, 0, 7)"});
  x.p.adt.set(7, -0.1);
  x.p.angles.set(3, INFINITY);
  expect_error(forward(x.f), StatusCode::kInvalidArgument, {"angles", "non-finite"});
}

TEST(Validation, GradientForAbsentInput) {
  check::ProblemConfig c = base();
  c.has_d = false;
  Fixture x(c);
  check::GradBuffers g = x.p.make_grads(false);
  std::vector<float> gd(4);
  check::HostTensor dout = x.p.random_d_out(DType::kF32, 1);
  BackwardArgs b;
  b.in = x.f.in;
  b.d_out = dout.view();
  b.grads = g.view();
  b.grads.d = make_tensor(gd.data(), DType::kF32, {4});
  expect_error(validate(b), StatusCode::kInvalidArgument, {"grads.d", "absent"});
}

TEST(Validation, EmptySequencesAndZeroLengthAreValid) {
  for (Lane lane : {Lane::kReference, Lane::kCpu}) {
    check::ProblemConfig c = base();
    c.L = 0;
    Fixture x(c);
    x.f.lane = lane;
    ASSERT_TRUE(forward(x.f).ok()) << lane_name(lane);
    // Final states of an empty sequence are the initial ones (angle wrapped).
    for (int64_t i = 0; i < x.fs.ssm.numel(); ++i)
      ASSERT_EQ(x.fs.ssm.get(i), x.p.initial.ssm.get(i));
    for (int64_t i = 0; i < x.fs.angle.numel(); ++i)
      ASSERT_NEAR(x.fs.angle.get(i), x.p.initial.angle.get(i), 1e-6);
  }
}

// The PsiV cache is the cuda lane's (tensor-core path, tests/cuda); the reference and cpu lanes
// fail closed.
TEST(Gates, PsivCacheFailsClosedNamingTheGate) {
  Fixture x(base());
  ASSERT_EQ(setenv("MAMBA3_PSIV_CACHE", "1", 1), 0);
  for (Lane lane : {Lane::kReference, Lane::kCpu}) {
    x.f.lane = lane;
    expect_error(forward(x.f), StatusCode::kNotSupported, {"MAMBA3_PSIV_CACHE"});
  }
  ASSERT_EQ(setenv("MAMBA3_PSIV_CACHE", "maybe", 1), 0);
  expect_error(forward(x.f), StatusCode::kInvalidArgument, {"MAMBA3_PSIV_CACHE", "maybe"});
  bool listed = false;
  for (const GateInfo& g : gates()) listed |= g.env_var == "MAMBA3_PSIV_CACHE";
  EXPECT_TRUE(listed);
  ASSERT_EQ(setenv("MAMBA3_PSIV_CACHE", "0", 1), 0);
  EXPECT_TRUE(forward(x.f).ok());
  ASSERT_EQ(unsetenv("MAMBA3_PSIV_CACHE"), 0);
  EXPECT_TRUE(forward(x.f).ok());
}

// `mamba3 info` lists the cuda lane's gates with their current state; an invalid value is named.
TEST(Gates, CudaGatesListedWithTheirState) {
  auto find = [](const std::string& name) {
    for (const GateInfo& g : gates())
      if (g.env_var == name) return g;
    ADD_FAILURE() << name << " not listed";
    return GateInfo{};
  };
  ASSERT_EQ(unsetenv("MAMBA3_CUDA_STEP_PERSISTENT"), 0);
  EXPECT_TRUE(find("MAMBA3_CUDA_STEP_PERSISTENT").set);
  EXPECT_TRUE(find("MAMBA3_CUDA_BWD_MIMO_TC").set);
  ASSERT_EQ(setenv("MAMBA3_CUDA_STEP_PERSISTENT", "0", 1), 0);
  EXPECT_FALSE(find("MAMBA3_CUDA_STEP_PERSISTENT").set);
  ASSERT_EQ(setenv("MAMBA3_CUDA_STEP_PERSISTENT", "yes", 1), 0);
  EXPECT_NE(find("MAMBA3_CUDA_STEP_PERSISTENT").description.find("invalid: 'yes'"),
            std::string::npos);
  ASSERT_EQ(unsetenv("MAMBA3_CUDA_STEP_PERSISTENT"), 0);
  ASSERT_EQ(unsetenv("MAMBA3_CUDA_SAVE_TILES"), 0);
  EXPECT_TRUE(find("MAMBA3_CUDA_SAVE_TILES").set);
  ASSERT_EQ(setenv("MAMBA3_CUDA_SAVE_TILES", "0", 1), 0);
  EXPECT_FALSE(find("MAMBA3_CUDA_SAVE_TILES").set);
  ASSERT_EQ(unsetenv("MAMBA3_CUDA_SAVE_TILES"), 0);
  ASSERT_EQ(unsetenv("MAMBA3_CUDA_SAVE_Y"), 0);
  EXPECT_TRUE(find("MAMBA3_CUDA_SAVE_Y").set);
  ASSERT_EQ(setenv("MAMBA3_CUDA_SAVE_Y", "0", 1), 0);
  EXPECT_FALSE(find("MAMBA3_CUDA_SAVE_Y").set);
  ASSERT_EQ(setenv("MAMBA3_CUDA_SAVE_Y", "2", 1), 0);
  EXPECT_NE(find("MAMBA3_CUDA_SAVE_Y").description.find("invalid: '2'"), std::string::npos);
  ASSERT_EQ(unsetenv("MAMBA3_CUDA_SAVE_Y"), 0);
}

// Without a cuda call (no GPU here, or none yet) there is no cached workspace: releasing it is
// a no-op that reports 0 bytes.
TEST(Lanes, ReleaseCachedMemoryWithoutCudaCalls) {
  size_t released = 123;
  const Status st = release_cached_memory(&released);
  EXPECT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(released, 0u);
  EXPECT_TRUE(release_cached_memory().ok());
}

TEST(Lanes, CudaLaneSaysWhatItIs) {
  // No CUDA tensors on this path; the cuda lane entry point must refuse clearly, never run
  // something else.
  bool found = false;
  for (const LaneInfo& l : lanes())
    if (l.name == "cuda") {
      found = true;
      EXPECT_FALSE(l.available);
    }
  EXPECT_TRUE(found);
}

// build_options() names the source commit (cmake/build_commit.cmake). In a git checkout it is a
// commit of this repository (with "-dirty" where tracked files differed at build time), never
// "unknown"; commits made after the build do not make it wrong.
TEST(BuildInfo, CommitOfTheSourceTree) {
  std::string commit;
  std::istringstream in(build_options());
  for (std::string line; std::getline(in, line);)
    if (line.rfind("commit=", 0) == 0) commit = line.substr(7);
  ASSERT_FALSE(commit.empty()) << build_options();
  const std::string src = MAMBA3_SOURCE_DIR;
  if (std::system(("git -C '" + src + "' rev-parse --git-dir > /dev/null 2>&1").c_str()) != 0)
    GTEST_SKIP() << "no git checkout at " << src << " (commit=" << commit << ")";
  ASSERT_NE(commit, "unknown");
  std::string hash = commit;
  const std::string dirty = "-dirty";
  if (hash.size() > dirty.size() &&
      hash.compare(hash.size() - dirty.size(), dirty.size(), dirty) == 0)
    hash.resize(hash.size() - dirty.size());
  if (const size_t g = hash.rfind("-g"); g != std::string::npos)  // <tag>-<n>-g<hash>
    hash = hash.substr(g + 2);
  EXPECT_EQ(
      std::system(("git -C '" + src + "' cat-file -e '" + hash + "^{commit}' 2>/dev/null").c_str()),
      0)
      << "commit=" << commit << " is not a commit of " << src;
}

}  // namespace
}  // namespace mamba3::test
