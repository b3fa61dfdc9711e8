#include "check/safetensors.h"

#include <bit>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>

namespace mamba3::check {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors stores little-endian data; this reader copies bytes as they are");

using json = nlohmann::json;

// Header sizes above this are rejected before allocation (the format's own limit is 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DTypeInfo {
  const char* name;
  int64_t size;
  std::optional<DType> dtype;  // nullopt: I64 (converted to I32 on read)
};

constexpr DTypeInfo kDTypes[] = {
    {"F32", 4, DType::kF32}, {"F64", 8, DType::kF64}, {"BF16", 2, DType::kBF16},
    {"F16", 2, DType::kF16}, {"I32", 4, DType::kI32}, {"I64", 8, std::nullopt},
};

const DTypeInfo* find_dtype(const std::string& name) {
  for (const DTypeInfo& info : kDTypes) {
    if (name == info.name) return &info;
  }
  return nullptr;
}

const char* safetensors_name(DType dtype) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.dtype == dtype) return info.name;
  }
  return "?";
}

Status tensor_error(const std::string& source, const std::string& name, const std::string& what) {
  return Status::InvalidArgument(source + ": tensor '" + name + "': " + what);
}

// Parses one header entry and copies its bytes out of `data` (the buffer after the header).
Status read_tensor(const std::string& source, const std::string& name, const json& entry,
                   const unsigned char* data, uint64_t data_size, HostTensor* out) {
  if (!entry.is_object()) return tensor_error(source, name, "header entry is not an object");
  auto dtype_it = entry.find("dtype");
  auto shape_it = entry.find("shape");
  auto offsets_it = entry.find("data_offsets");
  if (dtype_it == entry.end() || !dtype_it->is_string()) {
    return tensor_error(source, name, "missing or non-string 'dtype'");
  }
  if (shape_it == entry.end() || !shape_it->is_array()) {
    return tensor_error(source, name, "missing or non-array 'shape'");
  }
  if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
    return tensor_error(source, name, "missing 'data_offsets' [begin, end]");
  }
  const std::string dtype_name = dtype_it->get<std::string>();
  const DTypeInfo* info = find_dtype(dtype_name);
  if (info == nullptr) {
    return tensor_error(source, name,
                        "unsupported dtype '" + dtype_name + "' (F32, F64, BF16, F16, I32, I64)");
  }
  std::vector<int64_t> shape;
  int64_t numel = 1;
  for (const json& dim : *shape_it) {
    if (!dim.is_number_unsigned()) {
      return tensor_error(source, name, "shape entries must be non-negative integers");
    }
    const uint64_t d = dim.get<uint64_t>();
    if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
        (d != 0 && numel > std::numeric_limits<int64_t>::max() / static_cast<int64_t>(d))) {
      return tensor_error(source, name, "shape too large");
    }
    shape.push_back(static_cast<int64_t>(d));
    numel *= static_cast<int64_t>(d);
  }
  if (shape.size() > static_cast<size_t>(kMaxDims)) {
    return tensor_error(
        source, name,
        "rank " + std::to_string(shape.size()) + " exceeds " + std::to_string(kMaxDims));
  }
  const json& b = (*offsets_it)[0];
  const json& e = (*offsets_it)[1];
  if (!b.is_number_unsigned() || !e.is_number_unsigned()) {
    return tensor_error(source, name, "data_offsets must be non-negative integers");
  }
  const uint64_t begin = b.get<uint64_t>();
  const uint64_t end = e.get<uint64_t>();
  if (begin > end || end > data_size) {
    return tensor_error(source, name,
                        "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                            ") outside the data buffer of " + std::to_string(data_size) + " bytes");
  }
  if (numel > std::numeric_limits<int64_t>::max() / info->size ||
      end - begin != static_cast<uint64_t>(numel * info->size)) {
    return tensor_error(source, name,
                        "data_offsets span " + std::to_string(end - begin) + " bytes, expected " +
                            std::to_string(numel) + " x " + std::to_string(info->size));
  }
  const unsigned char* src = data + begin;
  if (info->dtype.has_value()) {
    HostTensor t(*info->dtype, shape);
    if (numel > 0) std::memcpy(t.data(), src, static_cast<size_t>(end - begin));
    *out = std::move(t);
    return Status::Ok();
  }
  // I64: stored as I32 when every value fits.
  HostTensor t(DType::kI32, shape);
  auto* dst = static_cast<int32_t*>(t.data());
  for (int64_t i = 0; i < numel; ++i) {
    int64_t v;
    std::memcpy(&v, src + i * 8, 8);
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
      return tensor_error(source, name,
                          "I64 value " + std::to_string(v) + " at index " + std::to_string(i) +
                              " does not fit in int32");
    }
    dst[i] = static_cast<int32_t>(v);
  }
  *out = std::move(t);
  return Status::Ok();
}

}  // namespace

Status parse_safetensors(const std::vector<unsigned char>& bytes, const std::string& source,
                         SafetensorsFile* out) {
  *out = SafetensorsFile{};
  if (bytes.size() < 8) {
    return Status::InvalidArgument(
        source + ": truncated: " + std::to_string(bytes.size()) +
        " bytes, a safetensors file starts with an 8-byte header length");
  }
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  if (header_len > kMaxHeaderBytes || header_len > bytes.size() - 8) {
    return Status::InvalidArgument(source + ": header length " + std::to_string(header_len) +
                                   " exceeds the file (" + std::to_string(bytes.size()) +
                                   " bytes): truncated or not a safetensors file");
  }
  const char* header_begin = reinterpret_cast<const char*>(bytes.data() + 8);
  json header = json::parse(header_begin, header_begin + header_len, nullptr,
                            /*allow_exceptions=*/false);
  if (header.is_discarded()) {
    return Status::InvalidArgument(source + ": header is not valid JSON");
  }
  if (!header.is_object()) {
    return Status::InvalidArgument(source + ": header is not a JSON object");
  }
  const unsigned char* data = bytes.data() + 8 + header_len;
  const uint64_t data_size = bytes.size() - 8 - header_len;
  SafetensorsFile file;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        return Status::InvalidArgument(source + ": __metadata__ is not a JSON object");
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          return Status::InvalidArgument(source + ": __metadata__ value of '" + key +
                                         "' is not a string");
        }
        file.metadata[key] = value.get<std::string>();
      }
      continue;
    }
    HostTensor t;
    Status st = read_tensor(source, name, entry, data, data_size, &t);
    if (!st.ok()) return st;
    file.tensors.emplace(name, std::move(t));
  }
  *out = std::move(file);
  return Status::Ok();
}

Status read_safetensors(const std::string& path, SafetensorsFile* out) {
  *out = SafetensorsFile{};
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return Status::InvalidArgument(path + ": cannot open for reading");
  const std::streamsize size = in.tellg();
  if (size < 0) return Status::InvalidArgument(path + ": cannot determine the file size");
  std::vector<unsigned char> bytes(static_cast<size_t>(size));
  in.seekg(0);
  if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size)) {
    return Status::InvalidArgument(path + ": read error");
  }
  return parse_safetensors(bytes, path, out);
}

Status serialize_safetensors(const std::map<std::string, HostTensor>& tensors,
                             const std::map<std::string, std::string>& metadata,
                             std::vector<unsigned char>* bytes) {
  json header = json::object();
  if (!metadata.empty()) {
    json md = json::object();
    for (const auto& [key, value] : metadata) md[key] = value;
    header["__metadata__"] = std::move(md);
  }
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") {
      return Status::InvalidArgument("write_safetensors: '__metadata__' is not a tensor name");
    }
    if (!t.defined()) {
      return Status::InvalidArgument("write_safetensors: tensor '" + name + "' is absent");
    }
    const uint64_t nbytes = static_cast<uint64_t>(t.numel() * dtype_size(t.dtype()));
    header[name] = {{"dtype", safetensors_name(t.dtype())},
                    {"shape", t.shape()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  // Pad with spaces so the data starts 8-byte aligned (as the reference writer does).
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  bytes->clear();
  bytes->reserve(8 + text.size() + offset);
  const uint64_t header_len = text.size();
  const auto* len_bytes = reinterpret_cast<const unsigned char*>(&header_len);
  bytes->insert(bytes->end(), len_bytes, len_bytes + 8);
  bytes->insert(bytes->end(), text.begin(), text.end());
  for (const auto& [name, t] : tensors) {
    const auto* p = static_cast<const unsigned char*>(t.data());
    bytes->insert(bytes->end(), p, p + t.numel() * dtype_size(t.dtype()));
  }
  return Status::Ok();
}

Status write_safetensors(const std::string& path, const std::map<std::string, HostTensor>& tensors,
                         const std::map<std::string, std::string>& metadata) {
  std::vector<unsigned char> bytes;
  Status st = serialize_safetensors(tensors, metadata, &bytes);
  if (!st.ok()) return Status::InvalidArgument(path + ": " + st.message());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return Status::InvalidArgument(path + ": cannot open for writing");
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  if (!out) return Status::InvalidArgument(path + ": write error");
  return Status::Ok();
}

}  // namespace mamba3::check
