// Device copies of host tensors for the host-staged entry points (tools, tests, benchmarks):
// same shapes and strides, freed on destruction.
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "cuda/common/check.cuh"
#include "mamba3/mamba3.h"

namespace mamba3::cuda {

inline int64_t span_elems(const Tensor& t) {
  if (!t.defined() || t.numel() == 0) return 0;
  int64_t span = 1;
  for (int i = 0; i < t.ndim; ++i) span += (t.shape[i] - 1) * t.strides[i];
  return span;
}

// Device copies of host tensors, freed on destruction.
class Staging {
 public:
  ~Staging() {
    for (void* ptr : owned_) cudaFree(ptr);
  }
  // A device tensor with the same shape and strides; its contents copied when `copy_in`.
  // Outputs are copied in too: a strided view's span can cover elements it does not own (a
  // token slice of a larger buffer), and copy_back writes the whole span.
  Status mirror(const Tensor& host, bool copy_in, Tensor* dev) {
    *dev = host;
    if (!host.defined()) return Status::Ok();
    const size_t bytes = static_cast<size_t>(span_elems(host) * dtype_size(host.dtype));
    void* ptr = nullptr;
    if (bytes > 0) {
      MAMBA3_CHECK_CUDA(cudaMalloc(&ptr, bytes));
      owned_.push_back(ptr);
      if (copy_in) MAMBA3_CHECK_CUDA(cudaMemcpy(ptr, host.data, bytes, cudaMemcpyHostToDevice));
    }
    dev->data = ptr;
    dev->device = Device::kCUDA;
    copies_.push_back({host, *dev, bytes});
    return Status::Ok();
  }
  Status mirror_states(const States& host, bool copy_in, States* dev) {
    for (auto [h, d] : {std::pair{&host.angle, &dev->angle}, std::pair{&host.ssm, &dev->ssm},
                        std::pair{&host.k, &dev->k}, std::pair{&host.v, &dev->v}}) {
      Status st = mirror(*h, copy_in, d);
      if (!st.ok()) return st;
    }
    return Status::Ok();
  }
  // Copies a mirrored tensor back to its host tensor.
  Status copy_back(const Tensor& dev) {
    if (!dev.defined() || dev.data == nullptr) return Status::Ok();
    for (const Copy& c : copies_)
      if (c.dev.data == dev.data) {
        MAMBA3_CHECK_CUDA(cudaMemcpy(c.host.data, c.dev.data, c.bytes, cudaMemcpyDeviceToHost));
        return Status::Ok();
      }
    return Status::Internal("staging: tensor to copy back was not mirrored");
  }

 private:
  struct Copy {
    Tensor host, dev;
    size_t bytes;
  };
  std::vector<void*> owned_;
  std::vector<Copy> copies_;
};

}  // namespace mamba3::cuda
