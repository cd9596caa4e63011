// Host side of the fused decode step: checks, shape dispatch and launch of the kernel in
// decode_step_kernel.cuh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "decode_step.h"
#include "decode_step_kernel.cuh"

#ifndef FASTCOMER_CUDA_ARCHS
#define FASTCOMER_CUDA_ARCHS "unknown"
#endif

namespace fastcomer {
namespace {

void require(bool cond, const std::string& message) {
  if (!cond) throw std::invalid_argument("fastcomer._C.decode_step: " + message);
}

template <typename T, int NHEAD>
void launch_typed(const DecodeStepParams& p, cudaStream_t stream) {
  const size_t shared_bytes = sizeof(float) * shared_layout(NHEAD, p.head_dim, p.width).total;
  auto kernel = decode_step_kernel<T, NHEAD>;
  if (shared_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (err != cudaSuccess)
      throw std::runtime_error("fastcomer._C.decode_step: " + std::to_string(shared_bytes) + " bytes of shared memory (width " +
                               std::to_string(p.width) + "): " + cudaGetErrorString(err));
  }
  kernel<<<static_cast<unsigned>(p.rows), kThreads, shared_bytes, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("fastcomer._C.decode_step: launch failed: ") + cudaGetErrorString(err));
}

template <typename T>
void launch_nhead(const DecodeStepParams& p, cudaStream_t stream) {
  switch (p.nhead) {
    case 1: return launch_typed<T, 1>(p, stream);
    case 2: return launch_typed<T, 2>(p, stream);
    case 4: return launch_typed<T, 4>(p, stream);
    case 8: return launch_typed<T, 8>(p, stream);
    case 16: return launch_typed<T, 16>(p, stream);
    default: require(false, "nhead " + std::to_string(p.nhead) + " is not compiled; " + supported_shapes());
  }
}

}  // namespace

std::string supported_shapes() {
  return "supported: nhead in {1, 2, 4, 8, 16}, head_dim <= " + std::to_string(kMaxHeadDim) + ", dc == " + std::to_string(kDC) +
         ", q/k/v/out float32, float16 or bfloat16, coverage and ARM weights float32";
}

std::string build_info() {
  return "CUDA runtime " + std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10) +
         " (static), archs " FASTCOMER_CUDA_ARCHS;
}

void launch_decode_step(const DecodeStepParams& p, void* stream) {
  require(p.rows >= 0 && p.rows < (int64_t{1} << 31), "rows out of range");
  require(p.head_dim >= 1 && p.head_dim <= kMaxHeadDim, "head_dim " + std::to_string(p.head_dim) + " unsupported; " + supported_shapes());
  require(p.height >= 1 && p.width >= 1 && p.height * p.width == p.length, "height * width != L");
  require(p.q && p.k && p.v && p.key_padding_mask && p.image_index && p.returned && p.out, "a required pointer is null");
  if (p.coverage != nullptr) {
    require(p.dc == kDC, "dc " + std::to_string(p.dc) + " unsupported; " + supported_shapes());
    require(p.channels == p.nhead || p.channels == 2 * p.nhead, "channels must be nhead or 2 * nhead");
    require(p.conv_weight && p.conv_bias && p.proj_weight && p.shift, "ARM weights missing");
    require(p.rows <= 1 || p.coverage_stride_row >= p.channels * p.length, "coverage rows overlap");
  }
  require(!p.update_self || (p.coverage != nullptr && p.scratch != nullptr), "update_self needs coverage and scratch");
  require(p.prev_attn == nullptr || p.coverage != nullptr, "prev_attn (the cross-coverage update) needs coverage");
  if (p.rows == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat32: return launch_nhead<float>(p, s);
    case DType::kFloat16: return launch_nhead<__half>(p, s);
    case DType::kBFloat16: return launch_nhead<__nv_bfloat16>(p, s);
  }
  require(false, "unknown dtype code");
}

}  // namespace fastcomer
