// The chunked backward's translation unit: kernels (bwd_kernels.cuh) and their launch sequence
// (bwd_launch.cuh) compiled for sm_90a, behind the entry point of bwd_dispatch.h.
#include "cuda/chunk_bwd/bwd_dispatch.h"
#include "cuda/chunk_bwd/bwd_launch.cuh"

namespace mamba3::cuda {

Status backward_chunked(const BackwardArgs& args, const Dims& dims) {
  return bwd::backward_chunked(args, dims);
}

Status saved_layout_for(const Inputs& in, const Dims& dims, bool forward_tc, SavedLayout* out) {
  return bwd::saved_layout_for(in, dims, forward_tc, out);
}

std::string backward_configurations() {
  return "backward: tensor cores (bf16 mma.sync for the chunk products) for bf16 q, k, v with "
         "16-byte aligned contiguous rows at N, P in {64, 128} (MIMO: unless "
         "MAMBA3_CUDA_BWD_MIMO_TC=0), fp32 SIMT otherwise (any input "
         "dtype, N <= 128, P <= 128); R in {1, 2, 4, 8}, NA <= 64, deterministic; chunk of 64 "
         "rows (SIMT: 32 where shared memory is short)";
}

}  // namespace mamba3::cuda
