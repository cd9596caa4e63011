// Host side of the fused cross-attention step: checks, and the launches of the three kernels of
// cross_attention_step_kernel.cuh as plan_launches plans them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <stdexcept>
#include <string>

#include "cross_attention_step.h"
#include "cross_attention_step_kernel.cuh"

#ifndef FASTCOMER_CUDA_ARCHS
#define FASTCOMER_CUDA_ARCHS "unknown"
#endif

namespace fastcomer {
namespace {

void require(bool cond, const std::string& message) {
  if (!cond) throw std::invalid_argument("fastcomer._C.cross_attention_step: " + message);
}

void check_launch(const char* name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("fastcomer._C.cross_attention_step: launch of ") + name + " failed: " + cudaGetErrorString(err));
}

template <typename Kernel>
void allow_shared(Kernel kernel, size_t shared_bytes) {
  if (shared_bytes <= 48 * 1024) return;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
  if (err != cudaSuccess)
    throw std::runtime_error("fastcomer._C.cross_attention_step: " + std::to_string(shared_bytes) + " bytes of shared memory: " + cudaGetErrorString(err));
}

template <typename T>
void launch_typed(const CrossAttentionStepParams& p, cudaStream_t stream) {
  const CrossAttentionStepLaunches plan = plan_launches(p);
  const auto grid = [](const KernelLaunch& k) { return dim3(k.grid[0], k.grid[1], k.grid[2]); };
  if (plan.refinement.grid[0] > 0) {
    allow_shared(refinement_kernel, plan.refinement.shared_bytes);
    refinement_kernel<<<grid(plan.refinement), kThreads, plan.refinement.shared_bytes, stream>>>(p);
    check_launch("refinement_kernel");
  }
  allow_shared(partial_attention_kernel<T>, plan.partial_attention.shared_bytes);
  partial_attention_kernel<T><<<grid(plan.partial_attention), kThreads, plan.partial_attention.shared_bytes, stream>>>(p);
  check_launch("partial_attention_kernel");
  merge_kernel<T><<<grid(plan.merge), kThreads, plan.merge.shared_bytes, stream>>>(p);
  check_launch("merge_kernel");
}

}  // namespace

std::string supported_shapes() {
  return "supported: nhead <= " + std::to_string(kMaxHeads) + ", head_dim <= " + std::to_string(kMaxHeadDim) + ", dc == " + std::to_string(kDC) +
         ", q/k/v/out float32, float16 or bfloat16, coverage and ARM weights float32";
}

std::string build_info() {
  return "CUDA runtime " + std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10) +
         " (static), archs " FASTCOMER_CUDA_ARCHS;
}

void launch_cross_attention_step(const CrossAttentionStepParams& p, void* stream) {
  require(p.rows >= 0 && p.rows < (int64_t{1} << 31), "rows out of range");
  require(p.head_dim >= 1 && p.head_dim <= kMaxHeadDim, "head_dim " + std::to_string(p.head_dim) + " unsupported; " + supported_shapes());
  require(p.height >= 1 && p.width >= 1 && p.height * p.width == p.length, "height * width != L");
  require(p.nhead >= 1 && p.nhead <= kMaxHeads, "nhead " + std::to_string(p.nhead) + " is not supported; " + supported_shapes());
  require(p.q && p.k && p.v && p.key_padding_mask && p.image_index && p.returned && p.out && p.stats && p.partial,
          "a required pointer is null");
  require(p.rows_per_slot >= 1 && p.rows_per_slot <= kTile, "rows_per_slot must be in [1, 16]");
  for (const int64_t length : {p.split_length, p.tile_length})
    require(length >= kTile && length <= kMaxTile && length % kTile == 0, "split and tile lengths must be multiples of 16 up to 128");
  require(p.splits == (p.length + p.split_length - 1) / p.split_length, "splits != ceil(L / split_length)");
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
    case DType::kFloat32: return launch_typed<float>(p, s);
    case DType::kFloat16: return launch_typed<__half>(p, s);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(p, s);
  }
  require(false, "unknown dtype code");
}

}  // namespace fastcomer
