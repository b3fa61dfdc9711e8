// Entry of the cuda lane's chunked backward (src/cuda/chunk_bwd), called by dispatch.cu.
#pragma once

#include <string>

#include "core/validate.h"
#include "cuda/common/tile_record.cuh"
#include "mamba3/mamba3.h"

namespace mamba3::cuda {

// The backward on the call's stream: arguments validated (validate_backward), tensors on the
// device, cu_seqlens values checked. Asynchronous: allocates its workspace stream-ordered.
Status backward_chunked(const BackwardArgs& args, const Dims& dims);

// The cuda lane's saved-activation layout for these inputs (bytes 0: nothing saved); the forward
// takes the tensor cores when `forward_tc`. Queries the device (shared-memory limit).
Status saved_layout_for(const Inputs& in, const Dims& dims, bool forward_tc, SavedLayout* out);

// What the backward serves, in words (for `mamba3 info`).
std::string backward_configurations();

}  // namespace mamba3::cuda
