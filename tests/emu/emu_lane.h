// What the emulated tests share across their translation units: the hash lines of
// MAMBA3_EMU_HASH=1, and entry points into the emulated backward. A kernel header can be compiled
// into one translation unit only (its non-template kernels have external linkage):
// test_bwd_emu.cpp compiles the backward's (bwd_launch.cuh), test_fwd_emu.cpp the tensor-core
// forward's (fwd_tc_launch.cuh), so the forward's test reaches the backward through these.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "test_util.h"

namespace mamba3::cuda {
struct SavedLayout;
}  // namespace mamba3::cuda

namespace mamba3::test {

// FNV-1a over `bytes` bytes.
inline uint64_t fnv1a(const void* data, size_t bytes) {
  uint64_t h = 1469598103934665603ull;
  const auto* c = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) h = (h ^ c[i]) * 1099511628211ull;
  return h;
}

// MAMBA3_EMU_HASH=1: one FNV-1a hash of the bits of every entry of `r` (and the `extra` named
// hashes) per emulated run, so a refactor that must not change any result can be checked
// without a GPU (same hashes before and after).
inline void print_hashes(const Result& r, const std::string& label,
                         const std::vector<std::pair<std::string, uint64_t>>& extra = {}) {
  std::printf("  hash %s:", label.c_str());
  for (const auto& [name, v] : r)
    std::printf(" %s=%016llx", name.c_str(),
                static_cast<unsigned long long>(fnv1a(v.data(), v.size() * sizeof(double))));
  for (const auto& [name, h] : extra)
    std::printf(" %s=%016llx", name.c_str(), static_cast<unsigned long long>(h));
  std::printf("\n");
}

namespace emu {

// cuda::bwd::backward_chunked on the emulated kernels (test_bwd_emu.cpp): arguments validated,
// host tensors.
Status backward_chunked(const BackwardArgs& args, const Dims& dims);

// cuda::bwd::saved_layout_for (test_bwd_emu.cpp): the saved buffer's layout for these inputs
// (bytes 0: nothing saved), with the emulated device's shared-memory limit.
Status saved_layout_for(const Inputs& in, const Dims& dims, bool forward_tc,
                        cuda::SavedLayout* out);

}  // namespace emu
}  // namespace mamba3::test
