// Status, dtype and Tensor helpers of the public API.
#include <algorithm>
#include <sstream>

#include "mamba3/mamba3.h"

namespace mamba3 {

std::string Status::ToString() const {
  switch (code_) {
    case StatusCode::kOk: return "ok";
    case StatusCode::kInvalidArgument: return "invalid argument: " + message_;
    case StatusCode::kNotSupported: return "not supported: " + message_;
    case StatusCode::kInternal: return "internal error: " + message_;
  }
  return message_;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "float32";
    case DType::kF64: return "float64";
    case DType::kBF16: return "bfloat16";
    case DType::kF16: return "float16";
    case DType::kI32: return "int32";
  }
  return "?";
}

int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF64: return 8;
    case DType::kF32:
    case DType::kI32: return 4;
    case DType::kBF16:
    case DType::kF16: return 2;
  }
  return 0;
}

const char* lane_name(Lane lane) {
  switch (lane) {
    case Lane::kAuto: return "auto";
    case Lane::kReference: return "reference";
    case Lane::kCpu: return "cpu";
    case Lane::kCuda: return "cuda";
  }
  return "?";
}

int64_t Tensor::numel() const {
  if (!defined()) return 0;
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string Tensor::shape_string() const {
  if (!defined()) return "absent";
  std::ostringstream os;
  os << "(";
  for (int d = 0; d < ndim; ++d) os << (d ? ", " : "") << shape[d];
  if (ndim == 1) os << ",";
  os << ")";
  return os.str();
}

Tensor make_tensor(void* data, DType dtype, const std::vector<int64_t>& shape, Device device,
                   int device_index) {
  std::vector<int64_t> strides(shape.size());
  int64_t s = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    strides[d] = s;
    s *= shape[d];
  }
  return make_strided(data, dtype, shape, strides, device, device_index);
}

Tensor make_tensor(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device,
                   int device_index) {
  return make_tensor(data, dtype, std::vector<int64_t>(shape), device, device_index);
}

Tensor make_strided(void* data, DType dtype, const std::vector<int64_t>& shape,
                    const std::vector<int64_t>& strides, Device device, int device_index) {
  Tensor t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.device_index = device_index;
  // More than kMaxDims dims or mismatched strides make an invalid tensor that validation names.
  const size_t nd = std::min(shape.size(), static_cast<size_t>(kMaxDims));
  t.ndim = shape.size() > static_cast<size_t>(kMaxDims) || strides.size() != shape.size()
               ? kMaxDims + 1
               : static_cast<int>(nd);
  for (size_t d = 0; d < nd; ++d) {
    t.shape[d] = shape[d];
    t.strides[d] = d < strides.size() ? strides[d] : 0;
  }
  return t;
}

}  // namespace mamba3
