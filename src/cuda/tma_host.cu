#include "cuda/common/tma_host.h"

#include <cuda_runtime.h>

#include <mutex>

namespace mamba3::cuda {
namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled (CUDA 12.0 ABI), looked up once.
Status encode_tiled(EncodeTiled* fn) {
  static std::once_flag once;
  static EncodeTiled found = nullptr;
  static std::string error;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t e =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
    if (e != cudaSuccess)
      error = std::string("cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled): ") +
              cudaGetErrorString(e);
    else if (q != cudaDriverEntryPointSuccess || p == nullptr)
      error = "the CUDA driver has no cuTensorMapEncodeTiled (query result " +
              std::to_string(static_cast<int>(q)) + ")";
    else
      found = reinterpret_cast<EncodeTiled>(p);
  });
  if (found == nullptr) return Status::Internal(error);
  *fn = found;
  return Status::Ok();
}

}  // namespace

Status tma_encode(const TmaView& v, const void* base, const std::string& what, CUtensorMap* map) {
  const std::string err = tma_view_error(v, reinterpret_cast<uintptr_t>(base));
  if (!err.empty()) return Status::InvalidArgument(what + ": no copy-engine view: " + err);
  EncodeTiled fn = nullptr;
  if (Status st = encode_tiled(&fn); !st.ok()) return st;
  cuuint64_t dim[kTmaMaxRank], stride[kTmaMaxRank];
  cuuint32_t box[kTmaMaxRank], estride[kTmaMaxRank];
  for (int i = 0; i < v.rank; ++i) {
    dim[i] = v.dim[i], box[i] = v.box[i], estride[i] = 1;
    if (i > 0) stride[i - 1] = v.stride[i];
  }
  // The bytes are moved as they are (bf16 and fp16 as 16-bit words): out-of-view elements are
  // zero bits either way.
  const CUtensorMapDataType type =
      v.elem_bytes == 2 ? CU_TENSOR_MAP_DATA_TYPE_UINT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
  const CUresult r =
      fn(map, type, static_cast<cuuint32_t>(v.rank), const_cast<void*>(base), dim, stride, box,
         estride, CU_TENSOR_MAP_INTERLEAVE_NONE,
         v.swizzle == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
         CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    return Status::Internal(what + ": cuTensorMapEncodeTiled failed (CUresult " +
                            std::to_string(static_cast<int>(r)) + ")");
  return Status::Ok();
}

}  // namespace mamba3::cuda
