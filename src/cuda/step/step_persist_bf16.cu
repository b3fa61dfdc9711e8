// The persistent decode-step kernels for bf16 inputs (step_persist_kernel.cuh), one file per dtype
// so the instantiations compile in parallel.
#include "cuda/step/step_persist_launch.cuh"

namespace mamba3::cuda::decode {

template Status launch_persist<__nv_bfloat16>(const StepPersistParams&, int, int, int, cudaStream_t);

}  // namespace mamba3::cuda::decode
