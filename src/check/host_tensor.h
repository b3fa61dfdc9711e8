// An owning, row-major host buffer with a Tensor view. Used by the CLI, the golden runner, the
// problem generator and the tests; not part of the public API.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "mamba3/mamba3.h"

namespace mamba3::check {

class HostTensor {
 public:
  HostTensor() = default;  // absent
  HostTensor(DType dtype, std::vector<int64_t> shape);  // zero-filled

  bool defined() const { return defined_; }
  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t numel() const;
  void* data() { return bytes_.data(); }
  const void* data() const { return bytes_.data(); }

  // Flat (row-major) element access as double; set() rounds to the dtype.
  double get(int64_t i) const;
  void set(int64_t i, double value);
  std::vector<double> to_double() const;

  // View; absent Tensor when !defined().
  Tensor view() const;
  // Copy converted to another dtype (rounding).
  HostTensor to(DType dtype) const;
  // Copy of entries [begin, end) along `axis`; absent stays absent.
  HostTensor slice(int axis, int64_t begin, int64_t end) const;
  // Copy of entry `index` along `axis`, that axis removed.
  HostTensor select(int axis, int64_t index) const;

 private:
  bool defined_ = false;
  DType dtype_ = DType::kF32;
  std::vector<int64_t> shape_;
  std::vector<unsigned char> bytes_;
};

}  // namespace mamba3::check
