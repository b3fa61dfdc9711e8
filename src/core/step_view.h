// A decode step is a one-token prefill whose initial and final states are the same buffers:
// these views re-express StepArgs as ForwardArgs without copying (a length-1 axis with any
// stride). Lanes that read every initial state of a (sequence, head) before writing its final
// state may run a step through their forward path.
#pragma once

#include "mamba3/mamba3.h"

namespace mamba3 {

inline Tensor insert_axis(const Tensor& t, int axis) {
  if (!t.defined()) return t;
  Tensor o = t;
  o.ndim = t.ndim + 1;
  for (int d = 0, s = 0; d < o.ndim; ++d) {
    if (d == axis) {
      o.shape[d] = 1;
      o.strides[d] = 1;
    } else {
      o.shape[d] = t.shape[s];
      o.strides[d] = t.strides[s];
      ++s;
    }
  }
  return o;
}

inline ForwardArgs step_as_forward(const StepArgs& a) {
  ForwardArgs f;
  f.in.q = insert_axis(a.q, 1);        // (B, 1, R, G, N) or (B, 1, G, N)
  f.in.k = insert_axis(a.k, 1);
  f.in.v = insert_axis(a.v, 1);        // (B, 1, H, P)
  f.in.adt = insert_axis(a.adt, 2);    // (B, H, 1)
  f.in.dt = insert_axis(a.dt, 2);
  f.in.trap = insert_axis(a.trap, 2);
  f.in.angles = insert_axis(a.angles, 1);  // (B, 1, H, NA)
  f.in.q_bias = a.q_bias;
  f.in.k_bias = a.k_bias;
  f.in.d = a.d;
  f.in.z = insert_axis(a.z, 1);
  f.in.mimo_v = a.mimo_v;
  f.in.mimo_z = a.mimo_z;
  f.in.mimo_o = a.mimo_o;
  f.in.norm_weight = a.norm_weight;
  f.in.initial = a.state;
  f.in.rope_pairing = a.rope_pairing;
  f.in.norm_eps = a.norm_eps;
  f.out = insert_axis(a.out, 1);       // (B, 1, H, P) or (B, 1, R, H, P)
  f.final_states = a.state;
  f.lane = a.lane;
  f.stream = a.stream;
  f.num_threads = 1;
  return f;
}

}  // namespace mamba3
