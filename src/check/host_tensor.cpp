#include "check/host_tensor.h"

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

}  // namespace mamba3::check
