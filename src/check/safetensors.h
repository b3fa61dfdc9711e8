// Reader and writer for the .safetensors format: an 8-byte little-endian header length, a JSON
// header {name: {dtype, shape, data_offsets: [begin, end)}, "__metadata__": {string: string}},
// then the raw little-endian tensor bytes. Used for the golden vectors and the tests.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "check/host_tensor.h"
#include "mamba3/mamba3.h"

namespace mamba3::check {

struct SafetensorsFile {
  std::map<std::string, std::string> metadata;  // "__metadata__"; empty when absent
  std::map<std::string, HostTensor> tensors;    // by name, row-major
};

// Reads F32, F64, BF16, F16 and I32 tensors as they are; I64 tensors are converted to I32 when
// every value fits (else an error). Errors name the file and, where it applies, the tensor.
Status read_safetensors(const std::string& path, SafetensorsFile* out);

// The same from bytes already in memory; `source` names them in error messages.
Status parse_safetensors(const std::vector<unsigned char>& bytes, const std::string& source,
                         SafetensorsFile* out);

// Writes `tensors` (in name order, 8-byte aligned) and `metadata` (omitted when empty).
Status write_safetensors(const std::string& path, const std::map<std::string, HostTensor>& tensors,
                         const std::map<std::string, std::string>& metadata = {});

// The same into a byte buffer.
Status serialize_safetensors(const std::map<std::string, HostTensor>& tensors,
                             const std::map<std::string, std::string>& metadata,
                             std::vector<unsigned char>* bytes);

}  // namespace mamba3::check
