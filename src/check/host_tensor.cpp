#include "check/host_tensor.h"

#include <cstring>

#include "common/numeric.h"

namespace mamba3::check {

HostTensor::HostTensor(DType dtype, std::vector<int64_t> shape)
    : defined_(true), dtype_(dtype), shape_(std::move(shape)) {
  bytes_.assign(static_cast<size_t>(numel() * dtype_size(dtype_)), 0);
}

int64_t HostTensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape_) n *= s;
  return defined_ ? n : 0;
}

double HostTensor::get(int64_t i) const { return load_as_double(bytes_.data(), dtype_, i); }

void HostTensor::set(int64_t i, double value) {
  store_from_double(bytes_.data(), dtype_, i, value);
}

std::vector<double> HostTensor::to_double() const {
  std::vector<double> out(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < numel(); ++i) out[static_cast<size_t>(i)] = get(i);
  return out;
}

Tensor HostTensor::view() const {
  if (!defined_) return Tensor{};
  return make_tensor(const_cast<unsigned char*>(bytes_.data()), dtype_, shape_);
}

HostTensor HostTensor::to(DType dtype) const {
  if (!defined_) return HostTensor{};
  HostTensor out(dtype, shape_);
  for (int64_t i = 0; i < numel(); ++i) out.set(i, get(i));
  return out;
}

HostTensor HostTensor::slice(int axis, int64_t begin, int64_t end) const {
  if (!defined_) return HostTensor{};
  std::vector<int64_t> shape = shape_;
  const int64_t full = shape[axis], len = end - begin;
  shape[axis] = len;
  HostTensor out(dtype_, shape);
  int64_t outer = 1, inner = dtype_size(dtype_);
  for (int d = 0; d < axis; ++d) outer *= shape[d];
  for (size_t d = axis + 1; d < shape.size(); ++d) inner *= shape[d];
  for (int64_t o = 0; o < outer; ++o)
    std::memcpy(out.bytes_.data() + o * len * inner, bytes_.data() + (o * full + begin) * inner,
                static_cast<size_t>(len * inner));
  return out;
}

HostTensor HostTensor::select(int axis, int64_t index) const {
  HostTensor out = slice(axis, index, index + 1);
  if (out.defined_) out.shape_.erase(out.shape_.begin() + axis);
  return out;
}

}  // namespace mamba3::check
