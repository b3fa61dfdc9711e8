// Every bundled golden file (tests/data/golden, or $MAMBA3_GOLDEN_DIR) through the reference
// and cpu lanes: every case must pass every output, final-state and gradient metric.
#include <gtest/gtest.h>

#include <cctype>
#include <filesystem>
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include "check/golden.h"
#include "check/safetensors.h"
#include "test_util.h"

namespace mamba3::check {
namespace {

constexpr const char* kGoldenFiles[] = {"golden_public_siso.safetensors",
                                        "golden_public_mimo.safetensors"};

using test::golden_path;

struct GoldenParam {
  std::string file;
  Lane lane;
};

// For failure messages: "golden_public_siso.safetensors on reference".
void PrintTo(const GoldenParam& p, std::ostream* os) {
  *os << p.file << " on " << lane_name(p.lane);
}

class GoldenTest : public testing::TestWithParam<GoldenParam> {};

TEST_P(GoldenTest, EveryCasePasses) {
  const std::string path = golden_path(GetParam().file);
  ASSERT_TRUE(std::filesystem::exists(path))
      << "golden file missing: " << path
      << " (bundled under tests/data/golden; MAMBA3_GOLDEN_DIR overrides the folder)";
  std::vector<CaseReport> reports;
  Status st = run_golden_file(path, GetParam().lane, &reports);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_FALSE(reports.empty()) << path << " has no cases";
  for (const CaseReport& r : reports) {
    SCOPED_TRACE(r.case_name + " on lane " + r.lane);
    EXPECT_TRUE(r.status.ok()) << r.status.ToString();
    int outputs = 0, grads = 0;
    std::string failing;
    for (const Metric& m : r.metrics) {
      outputs += m.name.rfind("out.", 0) == 0;
      grads += m.name.rfind("grad.", 0) == 0;
      if (!m.pass) failing += format_metric(m) + "\n";
    }
    EXPECT_TRUE(r.pass) << "failing metrics:\n" << format_metric_header() << "\n" << failing;
    // Guards against a vacuous pass: y and the four final states, and the gradients.
    EXPECT_GE(outputs, 5) << "too few output metrics";
    EXPECT_GE(grads, 10) << "too few gradient metrics";
  }
}

std::vector<GoldenParam> all_params() {
  std::vector<GoldenParam> params;
  for (const char* file : kGoldenFiles) {
    for (Lane lane : {Lane::kReference, Lane::kCpu}) params.push_back({file, lane});
  }
  return params;
}

INSTANTIATE_TEST_SUITE_P(Bundled, GoldenTest, testing::ValuesIn(all_params()),
                         [](const testing::TestParamInfo<GoldenParam>& info) {
                           std::string name = info.param.file.substr(0, info.param.file.find('.'));
                           name += std::string("_") + lane_name(info.param.lane);
                           for (char& c : name) {
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           }
                           return name;
                         });

TEST(Golden, MalformedFileIsAnError) {
  std::vector<CaseReport> reports;
  Status st = run_golden_file("/nonexistent/golden.safetensors", Lane::kReference, &reports);
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(reports.empty());
}

// One case of the bundled SISO file plus `extra`, written to a temp file; returns its path.
std::string one_case_file(const std::string& extra_name, const std::string& tag) {
  SafetensorsFile file;
  Status st = read_safetensors(golden_path(kGoldenFiles[0]), &file);
  EXPECT_TRUE(st.ok()) << st.ToString();
  std::map<std::string, HostTensor> tensors;
  for (auto& [name, t] : file.tensors) {
    if (name.rfind("siso_basic.", 0) == 0) tensors[name] = t;
  }
  tensors[extra_name] = HostTensor(DType::kF32, {2});
  const std::string cases =
      R"({"siso_basic": {"kind": "siso", "R": 1, "B": 2, "L": 130, "H": 4, "G": 1, "N": 32,
          "P": 16, "NA": 8, "S": 2, "states": false, "rope_pairing": "interleaved",
          "varlen": false, "seed": 1}})";
  const std::string path =
      (std::filesystem::temp_directory_path() / ("mamba3_golden_" + tag + ".safetensors")).string();
  st = write_safetensors(path, tensors, {{"format", "mamba3-golden-v2"}, {"cases", cases}});
  EXPECT_TRUE(st.ok()) << st.ToString();
  return path;
}

TEST(Golden, UnknownTensorNameFailsTheCase) {
  const std::string path = one_case_file("siso_basic.in.Bogus", "unknown_name");
  std::vector<CaseReport> reports;
  ASSERT_TRUE(run_golden_file(path, Lane::kReference, &reports).ok());
  ASSERT_EQ(reports.size(), 1u);
  EXPECT_FALSE(reports[0].pass);
  EXPECT_FALSE(reports[0].status.ok());
  EXPECT_NE(reports[0].status.message().find("in.Bogus"), std::string::npos)
      << reports[0].status.ToString();
  std::filesystem::remove(path);
}

TEST(Golden, UnknownRoleOrCaseIsAnError) {
  for (const char* extra : {"siso_basic.weird.X", "other_case.in.Q"}) {
    const std::string path = one_case_file(extra, "unknown_role");
    std::vector<CaseReport> reports;
    Status st = run_golden_file(path, Lane::kReference, &reports);
    EXPECT_FALSE(st.ok()) << extra;
    EXPECT_NE(st.message().find(extra), std::string::npos) << st.message();
    std::filesystem::remove(path);
  }
}

}  // namespace
}  // namespace mamba3::check
