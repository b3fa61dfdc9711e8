// The Hopper primitives (src/cuda/common/tma.cuh: TMA through tensor maps of tma_view.h's row
// tiles, mbarriers, the 128-byte swizzle, ldmatrix at swizzled addresses, wgmma with shared-
// memory and register operands) on the device, against host arithmetic: hopper_probe.cuh and
// hopper_probe_check.h. Also the host encoder's refusals. Skipped without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "cuda/common/tma_host.h"
#include "cuda/hopper_probe.cuh"
#include "cuda/hopper_probe_check.h"

namespace mamba3::test {
namespace {

using namespace hopper;
namespace probe = cuda::probe;

bool have_gpu(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    *why = e != cudaSuccess ? cudaGetErrorString(e) : "no device";
    return false;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess || prop.major < 9) {
    *why = "not an sm_90 device";
    return false;
  }
  return true;
}

#define REQUIRE_HOPPER()                               \
  do {                                                 \
    std::string why_;                                  \
    if (!have_gpu(&why_)) GTEST_SKIP() << why_;        \
  } while (0)

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(expr)

template <typename T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count) : n(count) {
    if (cudaMalloc(&p, count * sizeof(T)) != cudaSuccess) p = nullptr;
  }
  ~DevBuf() { cudaFree(p); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};

void run_probe_case(const ProbeCase& c) {
  const RowData q = make_rows(c, probe::kN, 11), k = make_rows(c, probe::kN, 12),
                v = make_rows(c, probe::kP, 13);
  DevBuf<uint16_t> dq(q.bits.size()), dk(k.bits.size()), dv(v.bits.size());
  ASSERT_TRUE(dq.p && dk.p && dv.p);
  CUDA_OK(cudaMemcpy(dq.p, q.bits.data(), q.bits.size() * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dk.p, k.bits.data(), k.bits.size() * 2, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dv.p, v.bits.data(), v.bits.size() * 2, cudaMemcpyHostToDevice));
  CUtensorMap qmap, kmap, vmap;
  auto encode = [&](const RowData& d, const void* base, const char* what, CUtensorMap* map) {
    const cuda::RowTileView rv = cuda::row_tile_view(d.t, reinterpret_cast<uintptr_t>(base), 64, 64, 128);
    ASSERT_EQ(rv.error, "") << what;
    const Status st = cuda::tma_encode(rv.view, base, what, map);
    ASSERT_TRUE(st.ok()) << st.message();
  };
  encode(q, dq.p, "q", &qmap);
  encode(k, dk.p, "k", &kmap);
  encode(v, dv.p, "v", &vmap);
  const int chunks = probe_chunks(c);
  const size_t cells = static_cast<size_t>(c.B) * c.G * chunks;
  DevBuf<__nv_bfloat16> oq(cells * 64 * 128), oqf(cells * 64 * 128);
  DevBuf<float> os(cells * 64 * 64), oy(cells * 64 * 64);
  ASSERT_TRUE(oq.p && oqf.p && os.p && oy.p);
  CUDA_OK(cudaFuncSetAttribute(probe::hopper_probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               probe::kSmemBytes));
  probe::hopper_probe_kernel<<<dim3(chunks, c.G, c.B), probe::kThreads, probe::kSmemBytes>>>(
      qmap, kmap, vmap, probe::ProbeOut{oq.p, oqf.p, os.p, oy.p});
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  ProbeResult r;
  r.q.resize(oq.n), r.qf.resize(oqf.n), r.s.resize(os.n), r.y.resize(oy.n);
  CUDA_OK(cudaMemcpy(r.q.data(), oq.p, oq.n * 2, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(r.qf.data(), oqf.p, oqf.n * 2, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(r.s.data(), os.p, os.n * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(r.y.data(), oy.p, oy.n * 4, cudaMemcpyDeviceToHost));
  check_probe(c, q, k, v, r);
}

TEST(CudaHopper, TmaSwizzleLdmatrixWgmma) {
  REQUIRE_HOPPER();
  for (const ProbeCase& c : probe_cases()) {
    SCOPED_TRACE(c.name);
    run_probe_case(c);
  }
}

// The encoder checks the view first: an illegal one is an InvalidArgument naming the tensor
// and the rule, before the driver sees it.
TEST(CudaHopper, EncodeRefusesIllegalViews) {
  REQUIRE_HOPPER();
  DevBuf<uint16_t> buf(1 << 16);
  ASSERT_TRUE(buf.p);
  cuda::RowTensor t;
  t.tokens = 64, t.cols = 128, t.s_token = 128, t.s_batch = 64 * 128;
  cuda::RowTileView ok = cuda::row_tile_view(t, reinterpret_cast<uintptr_t>(buf.p), 64, 64, 128);
  ASSERT_EQ(ok.error, "");
  CUtensorMap map;
  EXPECT_TRUE(cuda::tma_encode(ok.view, buf.p, "q", &map).ok());
  const Status misaligned = cuda::tma_encode(ok.view, reinterpret_cast<char*>(buf.p) + 2, "q", &map);
  EXPECT_EQ(misaligned.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(misaligned.message().find("q: no copy-engine view: global address is not 16-byte aligned"),
            std::string::npos)
      << misaligned.message();
  cuda::TmaView wide = ok.view;
  wide.box[0] = 128;  // 256-byte rows under the 128-byte swizzle
  const Status w = cuda::tma_encode(wide, buf.p, "k", &map);
  EXPECT_EQ(w.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(w.message().find("k: no copy-engine view: inner box row of 256 bytes exceeds the 128-byte swizzle span"),
            std::string::npos)
      << w.message();
}

}  // namespace
}  // namespace mamba3::test
