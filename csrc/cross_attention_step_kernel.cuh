// The fused cross-attention step as three kernels that split L across CTAs (flash-decoding), so that
// one image's call fills the GPU (the same split as fastcomer/ops/cross_attention_step/triton_kernel.py,
// planned by launch.launch_plan):
//
// 1. refinement_kernel, one CTA per (row, tile of L), refining layers only: the ARM's R of
//    the row's coverage image. The 5x5 conv is an implicit GEMM on tensor cores: M = the
//    tile's positions, N = dc, K = channels x taps (im2col chunks of 16 staged in shared
//    memory, conv_weight [dc][C][5][5] read as B[k][d] = conv_weight[d * K + k]), 3xTF32
//    wmma products for float32 accuracy; then ReLU, zero at padding, folded projection. R is
//    parked in `returned`.
// 2. partial_attention_kernel, one CTA per (slot, head, split of L): the slot's rows (the
//    beams that read one image) share the K/V tile, read once with vector loads:
//    S = Q K^T and P V as 3xTF32 wmma products over the slot's rows (padded to 16). The
//    split's softmax statistics go to `stats`, its unnormalised A'V to `partial`, S - R to
//    `returned`, S to `scratch` (when the self coverage is updated).
// 3. merge_kernel, one CTA per (row, tile of L): merges the splits' statistics, normalises
//    S - R into A', adds this step to the coverage sums (A to the self block, prev_attn to
//    the cross block) and, in tile 0, merges the partial A'V into `out`.
// The conv of kernel 1 reads the coverage across tile borders and kernel 3 updates it: two
// launches apart, no tile's conv sees another tile's update.
//
// Device code only (plus the launch plan). The includer provides the CUDA built-ins and
// nvcuda::wmma (nvcc, after cuda_fp16.h, cuda_bf16.h and mma.h; or
// tests/support/cuda_emulation.h, which runs a block as host threads).
#pragma once

#include <cmath>
#include <cstdint>

#include "cross_attention_step.h"

// Dynamic shared memory, sized by the launch (offsets in floats keep 32-byte alignment, as
// wmma's loads and stores need).
extern __shared__ __align__(128) float cross_attention_step_shared[];

namespace fastcomer {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kMinBlocks = 4;  // CTAs per SM the registers must allow: <= 128 registers a thread
constexpr int kPad = kKernelSize / 2;  // "same" padding of the conv
constexpr int kTaps = kKernelSize * kKernelSize;
constexpr int kStep = 8;       // wmma's K for tf32
constexpr int kChunk = 16;     // K of the conv's im2col per shared-memory stage
constexpr int kSkew = 8;       // extra floats per shared row: fewer bank conflicts, 32-byte aligned rows
// Finite start of the running maxima: exp(-inf - start) = 0, never inf - inf.
constexpr float kStartMax = -1.0e30f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Four consecutive elements as one load (16 bytes for float, 8 for the half types).
template <typename T> struct alignas(4 * sizeof(T)) Vec4 { T v[4]; };

// (max, sum of exp(x - max)) pairs: the online-softmax merge.
__device__ __forceinline__ void merge_stats(float& max_a, float& sum_a, float max_b, float sum_b) {
  const float m = fmaxf(max_a, max_b);
  sum_a = sum_a * __expf(max_a - m) + sum_b * __expf(max_b - m);
  max_a = m;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__host__ __device__ inline int round_up(int n, int multiple) { return (n + multiple - 1) / multiple * multiple; }

using Accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, kTile, kTile, kStep, float>;

// acc += A[16 x 8] B[8 x 16] from shared float memory, as three TF32 products (hi*lo, lo*hi,
// hi*hi: the error of float32, not TF32's 10-bit mantissa). A is row-major; B row- or
// column-major (LayoutB). Warp-collective.
template <typename LayoutB>
__device__ __forceinline__ void mma_3xtf32(Accumulator& acc, const float* a, int lda, const float* b, int ldb) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, kTile, kTile, kStep, wmma::precision::tf32, wmma::row_major> a_hi, a_lo;
  wmma::fragment<wmma::matrix_b, kTile, kTile, kStep, wmma::precision::tf32, LayoutB> b_hi, b_lo;
  wmma::load_matrix_sync(a_hi, a, lda);
  wmma::load_matrix_sync(b_hi, b, ldb);
#pragma unroll
  for (int i = 0; i < a_hi.num_elements; ++i) {
    const float x = a_hi.x[i];
    a_hi.x[i] = wmma::__float_to_tf32(x);
    a_lo.x[i] = wmma::__float_to_tf32(x - a_hi.x[i]);
  }
#pragma unroll
  for (int i = 0; i < b_hi.num_elements; ++i) {
    const float x = b_hi.x[i];
    b_hi.x[i] = wmma::__float_to_tf32(x);
    b_lo.x[i] = wmma::__float_to_tf32(x - b_hi.x[i]);
  }
  wmma::mma_sync(acc, a_lo, b_hi, acc);
  wmma::mma_sync(acc, a_hi, b_lo, acc);
  wmma::mma_sync(acc, a_hi, b_hi, acc);
}

__device__ __forceinline__ int64_t load_index(const CrossAttentionStepParams& p, int64_t row) {
  return p.image_index_int64 ? static_cast<const int64_t*>(p.image_index)[row] : static_cast<const int32_t*>(p.image_index)[row];
}

// Shared-memory layouts (in floats) of the three kernels.
struct RefinementLayout {
  int lda, ldb, ldc, a, b, conv, proj, bias, shift, total;
};
__host__ __device__ inline RefinementLayout refinement_layout(int tile) {
  RefinementLayout s;
  s.lda = kChunk + kSkew, s.ldb = kDC + kSkew, s.ldc = kDC + kSkew;
  s.a = 0;                              // im2col chunk [tile][kChunk]
  s.b = s.a + tile * s.lda;             // weights chunk [kChunk][kDC]
  s.conv = s.b + kChunk * s.ldb;        // conv outputs [tile][kDC]
  s.proj = s.conv + tile * s.ldc;       // [nhead][kDC]
  s.bias = s.proj + kMaxHeads * kDC;
  s.shift = s.bias + kDC;
  s.total = s.shift + kMaxHeads;
  return s;
}

struct AttentionLayout {
  int ld, lds, q, kv, s, o, total;  // ld: rows of q, kv, o (head_dim padded); lds: rows of s
};
__host__ __device__ inline AttentionLayout attention_layout(int head_dim, int split) {
  AttentionLayout s;
  s.ld = round_up(head_dim, kTile) + kSkew, s.lds = split + kSkew;
  s.q = 0;                         // Q [16][head_dim] of the slot's rows
  s.kv = s.q + kTile * s.ld;       // K, then V [split][head_dim]
  s.s = s.kv + split * s.ld;       // S, then P [16][split]
  s.o = s.s + kTile * s.lds;       // P V [16][head_dim]
  s.total = s.o + kTile * s.ld;
  return s;
}

constexpr int kMergeShared = kMaxHeads * kStats;

__global__ void __launch_bounds__(kThreads, kMinBlocks) refinement_kernel(const CrossAttentionStepParams p) {
  namespace wmma = nvcuda::wmma;
  float* smem = cross_attention_step_shared;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t row = blockIdx.x, L = p.length, width = p.width;
  const int tile = static_cast<int>(p.tile_length);
  const int64_t start = static_cast<int64_t>(blockIdx.y) * tile;
  const int64_t image = load_index(p, row);
  if (image < 0) return;  // inactive row: the merge writes its zeros
  const RefinementLayout layout = refinement_layout(tile);
  float* a_s = smem + layout.a;
  float* b_s = smem + layout.b;
  float* conv_s = smem + layout.conv;
  const float* coverage = p.coverage + row * p.coverage_stride_row;
  const int k_total = static_cast<int>(p.channels) * kTaps;
  for (int i = tid; i < p.nhead * kDC; i += kThreads) smem[layout.proj + i] = p.proj_weight[i];
  for (int i = tid; i < kDC; i += kThreads) smem[layout.bias + i] = p.conv_bias[i];
  for (int i = tid; i < p.nhead; i += kThreads) smem[layout.shift + i] = p.shift[i];

  // Warp w accumulates the output tiles w, w + kWarps, ... of [tile / 16] x [kDC / 16].
  const int out_tiles = tile / kTile * (kDC / kTile);
  constexpr int kAccumulators = kMaxTile / kTile * (kDC / kTile) / kWarps;
  Accumulator acc[kAccumulators];
#pragma unroll
  for (int j = 0; j < kAccumulators; ++j) wmma::fill_fragment(acc[j], 0.0f);
  for (int chunk = 0; chunk < k_total; chunk += kChunk) {
    __syncthreads();  // the previous chunk is consumed
    // im2col: consecutive threads take consecutive positions of one (channel, tap): coalesced
    for (int i = tid; i < tile * kChunk; i += kThreads) {
      const int m = i % tile, kk = i / tile, k = chunk + kk;
      const int64_t pos = start + m;
      float value = 0.0f;
      if (k < k_total && pos < L) {
        const int c = k / kTaps, tap = k % kTaps;
        const int64_t y = pos / width + tap / kKernelSize - kPad, x = pos % width + tap % kKernelSize - kPad;
        if (y >= 0 && y < p.height && x >= 0 && x < width) value = coverage[c * L + y * width + x];
      }
      a_s[m * layout.lda + kk] = value;
    }
    for (int i = tid; i < kChunk * kDC; i += kThreads) {  // runs of kChunk consecutive weights
      const int kk = i % kChunk, d = i / kChunk, k = chunk + kk;
      b_s[kk * layout.ldb + d] = k < k_total ? p.conv_weight[d * k_total + k] : 0.0f;
    }
    __syncthreads();
  #pragma unroll
    for (int j = 0; j < kAccumulators; ++j) {  // unrolled: the fragments stay in registers
      const int t = warp + j * kWarps, m = t / (kDC / kTile), n = t % (kDC / kTile);
      if (t >= out_tiles) break;
#pragma unroll
      for (int kk = 0; kk < kChunk; kk += kStep)
        mma_3xtf32<wmma::row_major>(acc[j], a_s + m * kTile * layout.lda + kk, layout.lda, b_s + kk * layout.ldb + n * kTile,
                                    layout.ldb);
    }
  }
#pragma unroll
  for (int j = 0; j < kAccumulators; ++j) {
    const int t = warp + j * kWarps, m = t / (kDC / kTile), n = t % (kDC / kTile);
    if (t >= out_tiles) break;
    wmma::store_matrix_sync(conv_s + m * kTile * layout.ldc + n * kTile, acc[j], layout.ldc, wmma::mem_row_major);
  }
  __syncthreads();
  // R [nhead][tile]: consecutive threads write consecutive positions of one head
  const uint8_t* mask = p.key_padding_mask + image * p.mask_stride_image;
  float* refinement = p.returned + row * p.nhead * L;
  for (int i = tid; i < p.nhead * tile; i += kThreads) {
    const int m = i % tile, n = i / tile;
    const int64_t pos = start + m;
    if (pos >= L) continue;
    float r = smem[layout.shift + n];
    if (mask[pos] == 0) {
      const float* conv = conv_s + m * layout.ldc;
      const float* proj = smem + layout.proj + n * kDC;
#pragma unroll 8
      for (int d = 0; d < kDC; ++d) r += proj[d] * fmaxf(conv[d] + smem[layout.bias + d], 0.0f);
    }
    refinement[n * L + pos] = r;
  }
}

// Loads rows [count][head_dim] (rows `stride` elements apart) into shared [count][ld] as float,
// zero beyond count_valid rows and head_dim: four elements per load when aligned.
template <typename T>
__device__ __forceinline__ void load_rows(float* dst, int ld, const T* src, int64_t stride, int count, int count_valid,
                                          int head_dim, bool vectorized) {
  const int groups = ld / 4;  // ld is a multiple of 8
  for (int i = threadIdx.x; i < count * groups; i += kThreads) {
    const int r = i / groups, d = i % groups * 4;
    float* out = dst + r * ld + d;
    if (r >= count_valid || d >= head_dim) {
      out[0] = out[1] = out[2] = out[3] = 0.0f;
    } else if (vectorized) {  // head_dim % 4 == 0
      const Vec4<T> v = *reinterpret_cast<const Vec4<T>*>(src + r * stride + d);
      out[0] = to_float(v.v[0]), out[1] = to_float(v.v[1]), out[2] = to_float(v.v[2]), out[3] = to_float(v.v[3]);
    } else {
      for (int e = 0; e < 4; ++e) out[e] = d + e < head_dim ? to_float(src[r * stride + d + e]) : 0.0f;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) partial_attention_kernel(const CrossAttentionStepParams p) {
  namespace wmma = nvcuda::wmma;
  float* smem = cross_attention_step_shared;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t slot = blockIdx.x, head = blockIdx.y, split = blockIdx.z, L = p.length, nhead = p.nhead;
  const int split_len = static_cast<int>(p.split_length), head_dim = static_cast<int>(p.head_dim);
  const int64_t first_row = slot * p.rows_per_slot;
  const int members = static_cast<int>(p.rows_per_slot < p.rows - first_row ? p.rows_per_slot : p.rows - first_row);
  // a slot's active rows all read one image (the launcher's contract), its inactive ones < 0
  int64_t image = -1;
  for (int g = 0; g < members; ++g) image = image > load_index(p, first_row + g) ? image : load_index(p, first_row + g);
  if (image < 0) return;  // the merge writes the zeros of inactive rows
  const AttentionLayout layout = attention_layout(head_dim, split_len);
  float* q_s = smem + layout.q;
  float* kv_s = smem + layout.kv;
  float* s_s = smem + layout.s;
  float* o_s = smem + layout.o;
  const int64_t start = split * split_len;
  const int valid = static_cast<int>(L - start < split_len ? L - start : split_len);
  const T* q = static_cast<const T*>(p.q) + first_row * p.q_stride_row + head * p.q_stride_head;
  const T* k = static_cast<const T*>(p.k) + image * p.k_stride_image + head * p.k_stride_head + start * p.k_stride_pos;
  const T* v = static_cast<const T*>(p.v) + image * p.v_stride_image + head * p.v_stride_head + start * p.v_stride_pos;
  load_rows(q_s, layout.ld, q, p.q_stride_row, kTile, members, head_dim, p.vectorized_q);
  load_rows(kv_s, layout.ld, k, p.k_stride_pos, split_len, valid, head_dim, p.vectorized_kv);
  __syncthreads();

  // S [16][split] = Q K^T: K in shared [split][ld] is K^T [ld][split] column-major
  const int head_steps = round_up(head_dim, kStep);
  for (int n = warp; n < split_len / kTile; n += kWarps) {
    Accumulator acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < head_steps; kk += kStep)
      mma_3xtf32<wmma::col_major>(acc, q_s + kk, layout.ld, kv_s + n * kTile * layout.ld + kk, layout.ld);
    wmma::store_matrix_sync(s_s + n * kTile, acc, layout.lds, wmma::mem_row_major);
  }
  __syncthreads();  // K consumed, S complete
  load_rows(kv_s, layout.ld, v, p.v_stride_pos, split_len, valid, head_dim, p.vectorized_kv);

  // Softmax statistics of the split: warp w takes rows w, w + kWarps, ...; lanes along L.
  const uint8_t* mask = p.key_padding_mask + image * p.mask_stride_image + start;
  constexpr int kPerLane = kMaxTile / 32;
  for (int g = warp; g < kTile; g += kWarps) {  // every warp runs every shuffle (uniform loop)
    const int64_t row = first_row + g;
    const bool active = g < members && load_index(p, row) >= 0;
    const int64_t offset = (row * nhead + head) * L + start;
    float s[kPerLane], t[kPerLane];
    float max_s = kStartMax, max_t = kStartMax;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int l = lane + 32 * j;
      const bool keep = active && l < valid && mask[l] == 0;
      s[j] = keep ? s_s[g * layout.lds + l] : -INFINITY;
      t[j] = keep && p.coverage != nullptr ? s[j] - p.returned[offset + l] : s[j];
      if (active && l < valid) {
        if (p.update_self) p.scratch[offset + l] = s[j];
        p.returned[offset + l] = t[j];
      }
      max_s = fmaxf(max_s, s[j]), max_t = fmaxf(max_t, t[j]);
    }
    max_s = warp_max(max_s), max_t = warp_max(max_t);
    float sum_s = 0.0f, sum_t = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int l = lane + 32 * j;
      const float prob = __expf(t[j] - max_t);  // 0 where masked or beyond the split
      if (l < split_len) s_s[g * layout.lds + l] = prob;  // P: S stays in `scratch`
      sum_t += prob, sum_s += __expf(s[j] - max_s);
    }
    sum_s = warp_sum(sum_s), sum_t = warp_sum(sum_t);
    if (active && lane == 0) {
      float* stats = p.stats + ((row * nhead + head) * p.splits + split) * kStats;
      stats[0] = max_s, stats[1] = sum_s, stats[2] = max_t, stats[3] = sum_t;
    }
  }
  __syncthreads();  // P and V complete

  // A'V of the split [16][head_dim] = P [16][split] V [split][head_dim]
  const int head_tiles = round_up(head_dim, kTile) / kTile;
  for (int n = warp; n < head_tiles; n += kWarps) {
    Accumulator acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < split_len; kk += kStep)
      mma_3xtf32<wmma::row_major>(acc, s_s + kk, layout.lds, kv_s + kk * layout.ld + n * kTile, layout.ld);
    wmma::store_matrix_sync(o_s + n * kTile, acc, layout.ld, wmma::mem_row_major);
  }
  __syncthreads();
  for (int i = tid; i < members * head_dim; i += kThreads) {
    const int g = i / head_dim, d = i % head_dim;
    const int64_t row = first_row + g;
    if (load_index(p, row) >= 0) p.partial[((row * nhead + head) * p.splits + split) * head_dim + d] = o_s[g * layout.ld + d];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) merge_kernel(const CrossAttentionStepParams p) {
  float* totals = cross_attention_step_shared;  // [nhead][kStats]: the call's statistics
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x, L = p.length, nhead = p.nhead, head_dim = p.head_dim, splits = p.splits;
  const int tile = static_cast<int>(p.tile_length);
  const int64_t start = static_cast<int64_t>(blockIdx.y) * tile;
  T* out = static_cast<T*>(p.out) + row * nhead * head_dim;
  float* returned = p.returned + row * nhead * L;
  if (load_index(p, row) < 0) {  // inactive row: output and returned attention 0, coverage untouched
    for (int i = tid; i < nhead * tile; i += kThreads)
      if (start + i % tile < L) returned[i / tile * L + start + i % tile] = 0.0f;
    if (blockIdx.y == 0)
      for (int i = tid; i < nhead * head_dim; i += kThreads) out[i] = from_float<T>(0.0f);
    return;
  }
  const float* stats = p.stats + row * nhead * splits * kStats;
  for (int n = tid; n < nhead; n += kThreads) {
    float max_s = kStartMax, sum_s = 0.0f, max_t = kStartMax, sum_t = 0.0f;
    for (int64_t j = 0; j < splits; ++j) {
      const float* split = stats + (n * splits + j) * kStats;
      merge_stats(max_s, sum_s, split[0], split[1]);
      merge_stats(max_t, sum_t, split[2], split[3]);
    }
    totals[n * kStats] = max_s, totals[n * kStats + 1] = sum_s, totals[n * kStats + 2] = max_t, totals[n * kStats + 3] = sum_t;
  }
  __syncthreads();
  float* coverage = p.coverage != nullptr ? p.coverage + row * p.coverage_stride_row : nullptr;
  const float* prev_attn = p.prev_attn != nullptr ? p.prev_attn + row * nhead * L : nullptr;
  const float* scores = p.update_self ? p.scratch + row * nhead * L : nullptr;
  for (int i = tid; i < nhead * tile; i += kThreads) {  // consecutive threads: consecutive positions
    const int64_t n = i / tile, pos = start + i % tile, at = n * L + pos;
    if (pos >= L) continue;
    const float* total = totals + n * kStats;
    returned[at] = __expf(returned[at] - total[2]) / total[3];
    if (prev_attn != nullptr) coverage[at] += prev_attn[at];
    if (scores != nullptr) coverage[(p.channels - nhead) * L + at] += __expf(scores[at] - total[0]) / total[1];
  }
  if (blockIdx.y == 0) {
    for (int i = tid; i < nhead * head_dim; i += kThreads) {
      const int64_t n = i / head_dim, d = i % head_dim;
      const float* total = totals + n * kStats;
      float acc = 0.0f;
      for (int64_t j = 0; j < splits; ++j)  // a fixed order: deterministic
        acc += p.partial[((row * nhead + n) * splits + j) * head_dim + d] * __expf(stats[(n * splits + j) * kStats + 2] - total[2]);
      out[i] = from_float<T>(acc / total[3]);
    }
  }
}

}  // namespace

// Grid (x, y, z) and dynamic shared bytes of one kernel; grid x == 0: not launched.
struct KernelLaunch {
  unsigned grid[3];
  size_t shared_bytes;
};
struct CrossAttentionStepLaunches {
  KernelLaunch refinement, partial_attention, merge;
};

inline CrossAttentionStepLaunches plan_launches(const CrossAttentionStepParams& p) {
  const unsigned rows = static_cast<unsigned>(p.rows), tiles = static_cast<unsigned>((p.length + p.tile_length - 1) / p.tile_length);
  const unsigned slots = static_cast<unsigned>((p.rows + p.rows_per_slot - 1) / p.rows_per_slot);
  CrossAttentionStepLaunches plan;
  plan.refinement = {{p.coverage != nullptr ? rows : 0u, tiles, 1u},
                     sizeof(float) * refinement_layout(static_cast<int>(p.tile_length)).total};
  plan.partial_attention = {{slots, static_cast<unsigned>(p.nhead), static_cast<unsigned>(p.splits)},
                            sizeof(float) * attention_layout(static_cast<int>(p.head_dim), static_cast<int>(p.split_length)).total};
  plan.merge = {{rows, tiles, 1u}, sizeof(float) * kMergeShared};
  return plan;
}

}  // namespace fastcomer
