// Device copies of host tensors for the host-staged entry points (tools, tests, benchmarks):
// same shapes and strides, freed on destruction.
#pragma once

#include <cuda_runtime.h>

#include <initializer_list>
#include <utility>
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
  // Every tensor of a forward (inputs, out, final states, saved) mirrored into `d`.
  Status stage_forward(const ForwardArgs& h, ForwardArgs* d) {
    *d = h;
    d->lane = Lane::kCuda;
    Status st = stage_inputs(h.in, &d->in);
    if (st.ok()) st = mirror(h.out, true, &d->out);
    if (st.ok()) st = mirror_states(h.final_states, true, &d->final_states);
    if (st.ok()) st = mirror(h.saved, true, &d->saved);
    return st;
  }
  // Every tensor of a decode step mirrored into `d`.
  Status stage_step(const StepArgs& h, StepArgs* d) {
    *d = h;
    d->lane = Lane::kCuda;
    for (auto [src, dst] :
         {std::pair{&h.q, &d->q}, std::pair{&h.k, &d->k}, std::pair{&h.v, &d->v},
          std::pair{&h.adt, &d->adt}, std::pair{&h.dt, &d->dt}, std::pair{&h.trap, &d->trap},
          std::pair{&h.angles, &d->angles}, std::pair{&h.q_bias, &d->q_bias},
          std::pair{&h.k_bias, &d->k_bias}, std::pair{&h.d, &d->d}, std::pair{&h.z, &d->z},
          std::pair{&h.mimo_v, &d->mimo_v}, std::pair{&h.mimo_z, &d->mimo_z},
          std::pair{&h.mimo_o, &d->mimo_o}, std::pair{&h.norm_weight, &d->norm_weight},
          std::pair{&h.out, &d->out}}) {
      Status st = mirror(*src, true, dst);
      if (!st.ok()) return st;
    }
    return mirror_states(h.state, true, &d->state);
  }
  // Every tensor of a backward (inputs, cotangents, gradients, saved) mirrored into `d`.
  Status stage_backward(const BackwardArgs& h, BackwardArgs* d) {
    *d = h;
    d->lane = Lane::kCuda;
    Status st = stage_inputs(h.in, &d->in);
    if (st.ok()) st = mirror(h.d_out, true, &d->d_out);
    if (st.ok()) st = mirror_states(h.d_final, true, &d->d_final);
    if (st.ok()) st = mirror(h.saved, true, &d->saved);
    const Grads& g = h.grads;
    Grads& dg = d->grads;
    for (auto [src, dst] :
         {std::pair{&g.q, &dg.q}, std::pair{&g.k, &dg.k}, std::pair{&g.v, &dg.v},
          std::pair{&g.adt, &dg.adt}, std::pair{&g.dt, &dg.dt}, std::pair{&g.trap, &dg.trap},
          std::pair{&g.q_bias, &dg.q_bias}, std::pair{&g.k_bias, &dg.k_bias},
          std::pair{&g.angles, &dg.angles}, std::pair{&g.d, &dg.d}, std::pair{&g.z, &dg.z},
          std::pair{&g.mimo_v, &dg.mimo_v}, std::pair{&g.mimo_z, &dg.mimo_z},
          std::pair{&g.mimo_o, &dg.mimo_o}, std::pair{&g.norm_weight, &dg.norm_weight}})
      if (st.ok()) st = mirror(*src, true, dst);
    if (st.ok()) st = mirror_states(g.initial, true, &dg.initial);
    return st;
  }
  // Copies every mirrored tensor that a call may have written back to the host.
  Status copy_back_all(std::initializer_list<const Tensor*> written) {
    for (const Tensor* t : written) {
      Status st = copy_back(*t);
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
  Status stage_inputs(const Inputs& h, Inputs* d) {
    *d = h;
    for (auto [src, dst] :
         {std::pair{&h.q, &d->q}, std::pair{&h.k, &d->k}, std::pair{&h.v, &d->v},
          std::pair{&h.adt, &d->adt}, std::pair{&h.dt, &d->dt}, std::pair{&h.trap, &d->trap},
          std::pair{&h.q_bias, &d->q_bias}, std::pair{&h.k_bias, &d->k_bias},
          std::pair{&h.angles, &d->angles}, std::pair{&h.d, &d->d}, std::pair{&h.z, &d->z},
          std::pair{&h.mimo_v, &d->mimo_v}, std::pair{&h.mimo_z, &d->mimo_z},
          std::pair{&h.mimo_o, &d->mimo_o}, std::pair{&h.norm_weight, &d->norm_weight},
          std::pair{&h.cu_seqlens, &d->cu_seqlens}}) {
      Status st = mirror(*src, true, dst);
      if (!st.ok()) return st;
    }
    return mirror_states(h.initial, true, &d->initial);
  }

  std::vector<void*> owned_;
  std::vector<Copy> copies_;
};

}  // namespace mamba3::cuda
