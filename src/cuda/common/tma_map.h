// A kernel's tensor map (tma.cuh's TmaMap) from a view, the same call on the device build
// (tma_host.h: the driver's encoder) and in the CPU emulation (tests/emu/emu.h: the checked view
// and its base, which the emulated copy engine reads).
#pragma once

#include <string>

#include "cuda/common/tma.cuh"
#include "mamba3/mamba3.h"

#ifndef MAMBA3_CUDA_EMU
#include "cuda/common/tma_host.h"
#endif

namespace mamba3::cuda {

inline Status make_tma_map(const TmaView& v, const void* base, const std::string& what, TmaMap* map) {
#ifdef MAMBA3_CUDA_EMU
  const std::string err = tma_view_error(v, reinterpret_cast<uintptr_t>(base));
  if (!err.empty()) return Status::InvalidArgument(what + ": no copy-engine view: " + err);
  *map = TmaMap{v, base};
  return Status::Ok();
#else
  return tma_encode(v, base, what, map);
#endif
}

}  // namespace mamba3::cuda
