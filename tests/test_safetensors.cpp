// The safetensors reader/writer: bit-exact round trip of every dtype, and errors for broken
// files that name the file and the tensor.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include "check/safetensors.h"

namespace mamba3::check {
namespace {

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("mamba3_test_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

// Bytes of a file with the given JSON header and data section.
std::vector<unsigned char> raw_file(const std::string& header, size_t data_bytes) {
  std::vector<unsigned char> bytes(8 + header.size() + data_bytes, 0);
  const uint64_t n = header.size();
  std::memcpy(bytes.data(), &n, 8);
  std::memcpy(bytes.data() + 8, header.data(), header.size());
  return bytes;
}

void write_bytes(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

HostTensor filled(DType dtype, std::vector<int64_t> shape, double scale) {
  HostTensor t(dtype, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t.set(i, scale * (static_cast<double>(i) - 3.25) / 7.0);
  return t;
}

TEST(Safetensors, RoundTripIsBitExact) {
  std::map<std::string, HostTensor> tensors;
  tensors["a.f32"] = filled(DType::kF32, {2, 3, 5}, 1.0);
  tensors["b.f64"] = filled(DType::kF64, {7}, 1e-3);
  tensors["c.bf16"] = filled(DType::kBF16, {3, 3}, 10.0);
  tensors["d.f16"] = filled(DType::kF16, {4, 1}, 2.0);
  tensors["e.i32"] = HostTensor(DType::kI32, {5});
  for (int i = 0; i < 5; ++i) static_cast<int32_t*>(tensors["e.i32"].data())[i] = -2 + 1000 * i;
  tensors["f.scalar"] = filled(DType::kF32, {}, 3.0);
  tensors["g.empty"] = HostTensor(DType::kF64, {0, 4});
  static_cast<double*>(tensors["b.f64"].data())[3] = std::numeric_limits<double>::quiet_NaN();
  const std::map<std::string, std::string> metadata = {{"format", "mamba3-test"},
                                                       {"cases", "{\"x\": 1}"}};

  const std::string path = temp_path("roundtrip.safetensors");
  ASSERT_TRUE(write_safetensors(path, tensors, metadata).ok());
  SafetensorsFile file;
  Status st = read_safetensors(path, &file);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(file.metadata, metadata);
  ASSERT_EQ(file.tensors.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    ASSERT_TRUE(file.tensors.count(name)) << name;
    const HostTensor& r = file.tensors.at(name);
    EXPECT_EQ(r.dtype(), t.dtype()) << name;
    EXPECT_EQ(r.shape(), t.shape()) << name;
    ASSERT_EQ(r.numel(), t.numel()) << name;
    EXPECT_EQ(
        std::memcmp(r.data(), t.data(), static_cast<size_t>(t.numel() * dtype_size(t.dtype()))), 0)
        << name;
  }
  std::filesystem::remove(path);
}

TEST(Safetensors, DataStartsAligned) {
  std::vector<unsigned char> bytes;
  ASSERT_TRUE(serialize_safetensors({{"x", filled(DType::kF32, {3}, 1.0)}}, {}, &bytes).ok());
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  EXPECT_EQ((8 + header_len) % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + header_len + 12);
}

TEST(Safetensors, I64ConvertsToI32WhenItFits) {
  auto bytes = raw_file(R"({"n":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}})", 16);
  const int64_t values[2] = {-7, 2147483647};
  std::memcpy(bytes.data() + bytes.size() - 16, values, 16);
  SafetensorsFile file;
  Status st = parse_safetensors(bytes, "mem", &file);
  ASSERT_TRUE(st.ok()) << st.ToString();
  const HostTensor& t = file.tensors.at("n");
  EXPECT_EQ(t.dtype(), DType::kI32);
  EXPECT_EQ(t.get(0), -7);
  EXPECT_EQ(t.get(1), 2147483647);

  const int64_t too_big[2] = {0, int64_t{1} << 40};
  std::memcpy(bytes.data() + bytes.size() - 16, too_big, 16);
  st = parse_safetensors(bytes, "mem", &file);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("'n'"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("int32"), std::string::npos) << st.message();
}

TEST(Safetensors, TruncatedFileIsAnError) {
  const std::string path = temp_path("truncated.safetensors");
  std::vector<unsigned char> bytes;
  ASSERT_TRUE(serialize_safetensors({{"x", filled(DType::kF32, {16}, 1.0)}}, {}, &bytes).ok());
  SafetensorsFile file;
  for (size_t keep : {size_t{0}, size_t{5}, size_t{12}, bytes.size() - 4}) {
    write_bytes(path, std::vector<unsigned char>(bytes.begin(), bytes.begin() + keep));
    Status st = read_safetensors(path, &file);
    EXPECT_FALSE(st.ok()) << "kept " << keep << " bytes";
    EXPECT_NE(st.message().find(path), std::string::npos) << st.message();
  }
  std::filesystem::remove(path);
}

TEST(Safetensors, MissingFileIsAnError) {
  SafetensorsFile file;
  Status st = read_safetensors("/nonexistent/dir/x.safetensors", &file);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("/nonexistent/dir/x.safetensors"), std::string::npos);
}

TEST(Safetensors, BadJsonIsAnError) {
  SafetensorsFile file;
  Status st = parse_safetensors(raw_file(R"({"x": {"dtype": "F32", )", 0), "bad.st", &file);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("bad.st"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("JSON"), std::string::npos) << st.message();

  st = parse_safetensors(raw_file(R"([1, 2])", 0), "arr.st", &file);
  EXPECT_FALSE(st.ok());
  st = parse_safetensors(raw_file(R"({"__metadata__": {"a": 1}})", 0), "md.st", &file);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("__metadata__"), std::string::npos) << st.message();
}

TEST(Safetensors, BadEntriesNameTheTensor) {
  const char* headers[] = {
      R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,64]}})",   // past the end
      R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[8,4]}})",    // begin > end
      R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}})",   // size != numel * 4
      R"({"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})",  // negative dim
      R"({"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})",     // unsupported dtype
      R"({"w":{"dtype":"F32","shape":[4]}})",                         // no offsets
      R"({"w":{"shape":[4],"data_offsets":[0,16]}})",                 // no dtype
  };
  for (const char* header : headers) {
    SafetensorsFile file;
    Status st = parse_safetensors(raw_file(header, 16), "f.st", &file);
    EXPECT_FALSE(st.ok()) << header;
    EXPECT_NE(st.message().find("f.st"), std::string::npos) << st.message();
    EXPECT_NE(st.message().find("'w'"), std::string::npos) << st.message();
  }
}

TEST(Safetensors, ReadsTheBundledGoldenFiles) {
  const std::string path =
      std::string(MAMBA3_SOURCE_DIR) + "/tests/data/golden/golden_public_siso.safetensors";
  SafetensorsFile file;
  Status st = read_safetensors(path, &file);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(file.metadata["format"], "mamba3-golden-v2");
  ASSERT_TRUE(file.tensors.count("siso_basic.in.Q"));
  EXPECT_EQ(file.tensors.at("siso_basic.in.Q").dtype(), DType::kF32);
  EXPECT_EQ(file.tensors.at("siso_basic.out.y").dtype(), DType::kF64);
  EXPECT_EQ(file.tensors.at("siso_varlen.in.cu_seqlens").dtype(), DType::kI32);
}

}  // namespace
}  // namespace mamba3::check
