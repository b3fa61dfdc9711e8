// Host side of the copy engine (TMA): a checked TmaView (tma_view.h) encoded into the driver's
// tensor map, which a kernel takes as a `const __grid_constant__ CUtensorMap` parameter.
#pragma once

#include <cuda.h>

#include <string>

#include "cuda/common/tma_view.h"
#include "mamba3/mamba3.h"

namespace mamba3::cuda {

// Checks the view over `base` against the copy engine's rules (an illegal one is an
// InvalidArgument naming `what` and the rule) and encodes it. The driver's encoder is looked
// up through the runtime (cudaGetDriverEntryPointByVersion): nothing links against libcuda.
Status tma_encode(const TmaView& v, const void* base, const std::string& what, CUtensorMap* map);

}  // namespace mamba3::cuda
