// The fused decode step of CoMER's cross-attention with the ARM: interface between the
// pybind11 bindings (host compiler) and the CUDA kernels (nvcc). No CUDA or torch types
// here, so bindings.cpp needs neither CUDA headers nor torch's C++ ABI.
#pragma once

#include <cstdint>
#include <string>

namespace fastcomer {

// The ARM conv's kernel size (CoMER's 5x5), exposed to Python as _C.KERNEL_SIZE, which must
// equal fastcomer.model.arm.KERNEL_SIZE.
constexpr int kKernelSize = 5;

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Raw device pointers and sizes for one layer's step over all rows (see
// fastcomer/ops/decode_step/ for the math). Strides count elements.
struct DecodeStepParams {
  const void* q = nullptr;                // [rows, nhead, head_dim], dtype
  const void* k = nullptr;                // [images, nhead, L, head_dim], dtype, strided
  const void* v = nullptr;                // like k
  const uint8_t* key_padding_mask = nullptr;  // [images, L], nonzero = padding
  const void* image_index = nullptr;      // [rows] int32 or int64; negative = inactive row
  bool image_index_int64 = false;
  float* coverage = nullptr;              // [rows, channels, L], rows coverage_stride_row apart; nullptr:
                                          // no refinement (layer 0). Updated after the conv reads it:
  int64_t coverage_stride_row = 0;
  const float* prev_attn = nullptr;       // [rows, nhead, L]: added to coverage's first nhead channels
                                          // (cross coverage); nullptr: no cross update
  bool update_self = false;               // add A to coverage's last nhead channels
  const float* conv_weight = nullptr;     // [dc, channels, 5, 5]
  const float* conv_bias = nullptr;       // [dc]
  const float* proj_weight = nullptr;     // [nhead, dc], BatchNorm folded
  const float* shift = nullptr;           // [nhead]
  float* scratch = nullptr;               // [rows, nhead, L]; needed with update_self only
  float* returned = nullptr;              // [rows, nhead, L]: A' (A without coverage), 0 for inactive rows
  void* out = nullptr;                    // [rows, nhead, head_dim], dtype, contiguous
  float* stats = nullptr;                 // [rows, nhead, splits, 4]: each split's softmax statistics
  float* partial = nullptr;               // [rows, nhead, splits, head_dim]: each split's A'V, unnormalised
  // The split of L (fastcomer.ops.decode_step.interface.launch_plan): slots of rows_per_slot
  // consecutive rows that read one image (or are inactive), splits of split_length positions
  // for the attention, tiles of tile_length positions for the refinement and the merge.
  int64_t rows_per_slot = 1, split_length = 16, splits = 0, tile_length = 16;
  bool vectorized_q = false, vectorized_kv = false;  // four-element loads are aligned
  DType dtype = DType::kFloat32;          // of q, k, v, out
  int64_t rows = 0, nhead = 0, head_dim = 0, length = 0, height = 0, width = 0, channels = 0, dc = 0;
  int64_t q_stride_row = 0, q_stride_head = 0;
  int64_t k_stride_image = 0, k_stride_head = 0, k_stride_pos = 0;
  int64_t v_stride_image = 0, v_stride_head = 0, v_stride_pos = 0;
  int64_t mask_stride_image = 0;
};

// Validates the parameters (std::invalid_argument) and launches on `stream` (a
// cudaStream_t); CUDA errors raise std::runtime_error.
void launch_decode_step(const DecodeStepParams& params, void* stream);

// The shapes this build supports and how it was built, for error messages and env reports.
std::string supported_shapes();
std::string build_info();

}  // namespace fastcomer
