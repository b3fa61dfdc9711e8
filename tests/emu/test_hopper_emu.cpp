// The Hopper probe (tests/cuda/hopper_probe.cuh) on the CPU through tests/emu/emu.h's
// emulations of TMA, mbarriers, the 128-byte swizzle and wgmma, with the GPU test's inputs and
// checks (hopper_probe_check.h): the emulation and the device (tests/cuda/test_hopper.cu) must
// both reproduce host arithmetic, so a kernel developed on the emulation reads its operands as
// the device does.
#define MAMBA3_CUDA_EMU 1
#include "emu.h"
// clang-format off
#include "cuda/hopper_probe.cuh"
// clang-format on

#include <gtest/gtest.h>

#include "cuda/hopper_probe_check.h"

namespace mamba3::cuda::probe {
alignas(16) unsigned char probe_smem[m3emu::kMaxDynamicSmem];
}  // namespace mamba3::cuda::probe

namespace mamba3::test {
namespace {

using namespace hopper;
namespace probe = cuda::probe;

void run_emu_case(const ProbeCase& c) {
  const RowData q = make_rows(c, probe::kN, 11), k = make_rows(c, probe::kN, 12),
                v = make_rows(c, probe::kP, 13);
  auto map_of = [](const RowData& d, const char* what) {
    const cuda::RowTileView rv = cuda::row_tile_view(d.t, reinterpret_cast<uintptr_t>(d.bits.data()), 64, 64, 128);
    EXPECT_EQ(rv.error, "") << what;
    return cuda::TmaMap{rv.view, d.bits.data()};
  };
  const cuda::TmaMap qm = map_of(q, "q"), km = map_of(k, "k"), vm = map_of(v, "v");
  const int chunks = probe_chunks(c);
  const size_t cells = static_cast<size_t>(c.B) * c.G * chunks;
  ProbeResult r;
  r.q.resize(cells * 64 * 128), r.qf.resize(cells * 64 * 128);
  r.s.resize(cells * 64 * 64), r.y.resize(cells * 64 * 64);
  m3emu::bind_dynamic_smem(probe::hopper_probe_kernel, probe::probe_smem, sizeof probe::probe_smem);
  m3emu::launch(probe::hopper_probe_kernel, dim3(chunks, c.G, c.B), dim3(probe::kThreads),
                probe::kSmemBytes, qm, km, vm,
                probe::ProbeOut{reinterpret_cast<__nv_bfloat16*>(r.q.data()),
                                reinterpret_cast<__nv_bfloat16*>(r.qf.data()), r.s.data(), r.y.data()});
  check_probe(c, q, k, v, r);
}

TEST(EmuHopper, TmaSwizzleLdmatrixWgmma) {
  for (const ProbeCase& c : probe_cases()) {
    SCOPED_TRACE(c.name);
    run_emu_case(c);
  }
}

}  // namespace
}  // namespace mamba3::test
