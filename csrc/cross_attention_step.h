// The fused decoding step of CoMER's cross-attention with the ARM: interface between the
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

// What this build's kernels accept, exported to Python as _C.LIMITS (fastcomer's
// cross_attention_step/cuda_kernel.py reads them from there, never a copy).
constexpr int kThreads = 128;     // threads per CTA of every kernel (the static report reads this line)
constexpr int kMaxHeads = 16;    // coverage channels <= 32
constexpr int kDC = 32;          // ARM conv channels (CoMER's dc): two wmma column tiles
constexpr int kMaxHeadDim = 128;
constexpr int kTile = 16;        // wmma's M and N; slots, tiles and splits are multiples of it (rows: at most)
constexpr int kMaxTile = 128;    // positions per CTA at most (must equal cross_attention_step/launch.py's MAX_TILE)
constexpr int kStats = 4;        // floats per split: max S, sum exp(S - max), max (S - R), sum exp(S - R - max)

// Every field of one layer's step over all rows, as X(type, name, default): raw device
// pointers and sizes (see fastcomer/ops/cross_attention_step/ for the math; strides count
// elements). The one list of them: the struct below, the Python bindings (CrossAttentionStepParams,
// whose fields Python sets by name; _C.CROSS_ATTENTION_STEP_FIELDS names them all) and the
// host emulation of the tests read it.
#define FASTCOMER_CROSS_ATTENTION_STEP_POINTERS(X)                                                         \
  X(const void*, q, nullptr)               /* [rows, nhead, head_dim], dtype */                          \
  X(const void*, k, nullptr)               /* [images, nhead, L, head_dim], dtype, strided */            \
  X(const void*, v, nullptr)               /* like k */                                                  \
  X(const uint8_t*, key_padding_mask, nullptr)  /* [images, L], nonzero = padding */                     \
  X(const void*, image_index, nullptr)     /* [rows] int32 or int64; negative = inactive row */          \
  X(float*, coverage, nullptr)             /* [rows, channels, L], rows coverage_stride_row apart;      \
                                              nullptr: no refinement (layer 0); updated after the conv  \
                                              reads it */                                                \
  X(const float*, prev_attn, nullptr)      /* [rows, nhead, L]: added to coverage's first nhead         \
                                              channels (cross coverage); nullptr: no cross update */     \
  X(const float*, conv_weight, nullptr)    /* [dc, channels, 5, 5] */                                    \
  X(const float*, conv_bias, nullptr)      /* [dc] */                                                    \
  X(const float*, proj_weight, nullptr)    /* [nhead, dc], BatchNorm folded */                           \
  X(const float*, shift, nullptr)          /* [nhead] */                                                 \
  X(float*, scratch, nullptr)              /* [rows, nhead, L]; needed with update_self only */          \
  X(float*, returned, nullptr)             /* [rows, nhead, L]: A' (A without coverage), 0 for inactive   \
                                              rows */                                                    \
  X(void*, out, nullptr)                   /* [rows, nhead, head_dim], dtype, contiguous */              \
  X(float*, stats, nullptr)                /* [rows, nhead, splits, kStats]: each split's statistics */  \
  X(float*, partial, nullptr)              /* [rows, nhead, splits, head_dim]: each split's A'V,         \
                                              unnormalised */

// The split of L (cross_attention_step/launch.py's launch_plan): slots of rows_per_slot
// consecutive rows that read one image (or are inactive), splits of split_length positions
// for the attention, tiles of tile_length positions for the refinement and the merge.
#define FASTCOMER_CROSS_ATTENTION_STEP_SCALARS(X)                                                          \
  X(bool, image_index_int64, false)                                                                     \
  X(int64_t, coverage_stride_row, 0)                                                                    \
  X(bool, update_self, false)  /* add A to coverage's last nhead channels */                            \
  X(int64_t, rows_per_slot, 1) X(int64_t, split_length, 16) X(int64_t, splits, 0)                       \
  X(int64_t, tile_length, 16)                                                                           \
  X(bool, vectorized_q, false) X(bool, vectorized_kv, false)  /* four-element loads are aligned */      \
  X(DType, dtype, DType::kFloat32)  /* of q, k, v, out */                                               \
  X(int64_t, rows, 0) X(int64_t, nhead, 0) X(int64_t, head_dim, 0) X(int64_t, length, 0)                \
  X(int64_t, height, 0) X(int64_t, width, 0) X(int64_t, channels, 0) X(int64_t, dc, 0)                  \
  X(int64_t, q_stride_row, 0) X(int64_t, q_stride_head, 0)                                              \
  X(int64_t, k_stride_image, 0) X(int64_t, k_stride_head, 0) X(int64_t, k_stride_pos, 0)                \
  X(int64_t, v_stride_image, 0) X(int64_t, v_stride_head, 0) X(int64_t, v_stride_pos, 0)                \
  X(int64_t, mask_stride_image, 0)

#define FASTCOMER_DECLARE_FIELD(type, name, value) type name = value;
struct CrossAttentionStepParams {
  FASTCOMER_CROSS_ATTENTION_STEP_POINTERS(FASTCOMER_DECLARE_FIELD)
  FASTCOMER_CROSS_ATTENTION_STEP_SCALARS(FASTCOMER_DECLARE_FIELD)
};
#undef FASTCOMER_DECLARE_FIELD

// Validates the parameters (std::invalid_argument) and launches on `stream` (a
// cudaStream_t); CUDA errors raise std::runtime_error.
void launch_cross_attention_step(const CrossAttentionStepParams& params, void* stream);

// The shapes this build supports and how it was built, for error messages and env reports.
std::string supported_shapes();
std::string build_info();

}  // namespace fastcomer
