// The fused decode step: one CTA per row (beam), all heads of that row.
//
// Pass 1, per tile of kThreads positions (one position per thread): S = q.K for every
// head; the ARM refinement R: the 5x5 conv over the coverage image, one input channel
// at a time (its halo patch and weights staged in shared memory, 32 conv outputs per
// thread in registers), ReLU, zero at padding, folded projection; running softmax
// statistics of S and S - R per thread; S - R parked in `returned`, S in `scratch` (only
// when the self coverage is updated).
// Pass 2, after a block-wide merge of the statistics (whose barriers also order every
// conv read of the coverage before its update): A' normalised into `returned` (what the
// layer returns), and this step added to the layer's own coverage sums: A to the self
// block, prev_attn (the previous layer's A') to the cross block.
// Pass 3: A'V, one warp per (head, slice of L), lanes along head_dim (coalesced V rows).
//
// Device code only. The includer provides the CUDA built-ins (nvcc, after cuda_fp16.h and
// cuda_bf16.h; or tests/cuda_emulation.h, which runs a block as host threads).
#pragma once

#include <cmath>
#include <cstdint>

#include "decode_step.h"

// Dynamic shared memory, sized by the launch (see shared_layout, whose offsets keep 16-byte
// alignment for float4 reads).
extern __shared__ __align__(16) float decode_step_shared[];

namespace fastcomer {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kDC = 32;       // ARM conv channels (CoMER's dc)
constexpr int kPad = kKernelSize / 2;             // "same" padding of the conv
constexpr int kTaps = kKernelSize * kKernelSize;
static_assert(kDC % 4 == 0, "conv weights are read as float4");
constexpr int kMaxHeadDim = 128;
constexpr int kDimsPerLane = kMaxHeadDim / 32;
// Finite start of the running maxima: exp(-inf - start) = 0, never inf - inf.
constexpr float kStartMax = -1.0e30f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// (max, sum of exp(x - max)) pairs: the online-softmax merge.
__device__ __forceinline__ void merge_stats(float& max_a, float& sum_a, float max_b, float sum_b) {
  const float m = fmaxf(max_a, max_b);
  sum_a = sum_a * __expf(max_a - m) + sum_b * __expf(max_b - m);
  max_a = m;
}

__device__ __forceinline__ void add_sample(float& running_max, float& running_sum, float x) {
  merge_stats(running_max, running_sum, x, 1.0f);
}

struct SharedLayout {
  int q, conv_weight, proj, conv_bias, shift, patch, stats, partial, total;
};

__host__ __device__ inline int round4(int n) { return (n + 3) & ~3; }

__host__ __device__ inline SharedLayout shared_layout(int nhead, int head_dim, int width) {
  SharedLayout s;
  s.q = 0;
  s.conv_weight = s.q + round4(nhead * head_dim);
  s.proj = s.conv_weight + kTaps * kDC;
  s.conv_bias = s.proj + nhead * kDC;
  s.shift = s.conv_bias + kDC;
  s.patch = s.shift + round4(nhead);
  s.stats = s.patch + round4(kThreads + 4 * width + 4);
  s.partial = s.stats + kWarps * nhead * 4;
  s.total = s.partial + kWarps * kMaxHeadDim;
  return s;
}

template <typename T, int NHEAD>
__global__ void __launch_bounds__(kThreads) decode_step_kernel(const DecodeStepParams p) {
  float* smem = decode_step_shared;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row = blockIdx.x;
  const int64_t L = p.length, width = p.width, head_dim = p.head_dim;
  const int64_t image = p.image_index_int64 ? static_cast<const int64_t*>(p.image_index)[row]
                                            : static_cast<const int32_t*>(p.image_index)[row];
  T* out = static_cast<T*>(p.out) + row * NHEAD * head_dim;
  float* refined = p.returned + row * NHEAD * L;  // S - R [NHEAD][L], then A'
  if (image < 0) {  // inactive row: output and returned attention 0, coverage untouched
    for (int i = tid; i < NHEAD * head_dim; i += kThreads) out[i] = from_float<T>(0.0f);
    for (int64_t i = tid; i < NHEAD * L; i += kThreads) refined[i] = 0.0f;
    return;
  }
  const SharedLayout layout = shared_layout(NHEAD, head_dim, width);
  float* q_s = smem + layout.q;
  float* weight_s = smem + layout.conv_weight;  // [kTaps][kDC] of the current input channel
  float* proj_s = smem + layout.proj;           // [NHEAD][kDC]
  float* bias_s = smem + layout.conv_bias;
  float* shift_s = smem + layout.shift;
  float* patch_s = smem + layout.patch;         // one coverage channel over the tile and its halo
  float* stats_s = smem + layout.stats;         // [kWarps][NHEAD][4]
  float* partial_s = smem + layout.partial;     // [kWarps][kMaxHeadDim]

  const T* q = static_cast<const T*>(p.q) + row * p.q_stride_row;
  for (int i = tid; i < NHEAD * head_dim; i += kThreads) q_s[i] = to_float(q[(i / head_dim) * p.q_stride_head + i % head_dim]);
  const bool refine = p.coverage != nullptr;
  if (refine) {
    for (int i = tid; i < NHEAD * kDC; i += kThreads) proj_s[i] = p.proj_weight[i];
    for (int i = tid; i < kDC; i += kThreads) bias_s[i] = p.conv_bias[i];
    for (int i = tid; i < NHEAD; i += kThreads) shift_s[i] = p.shift[i];
  }
  __syncthreads();

  const uint8_t* mask = p.key_padding_mask + image * p.mask_stride_image;
  const T* k = static_cast<const T*>(p.k) + image * p.k_stride_image;
  const T* v = static_cast<const T*>(p.v) + image * p.v_stride_image;
  float* coverage = refine ? p.coverage + row * p.coverage_stride_row : nullptr;
  float* scores = p.update_self ? p.scratch + row * NHEAD * L : nullptr;  // S [NHEAD][L]

  float max_s[NHEAD], sum_s[NHEAD], max_t[NHEAD], sum_t[NHEAD];
#pragma unroll
  for (int n = 0; n < NHEAD; ++n) max_s[n] = max_t[n] = kStartMax, sum_s[n] = sum_t[n] = 0.0f;

  for (int64_t start = 0; start < L; start += kThreads) {
    const int64_t pos = start + tid;
    const bool in_range = pos < L;
    const bool padded = !in_range || mask[pos] != 0;
    float s[NHEAD], r[NHEAD];
#pragma unroll
    for (int n = 0; n < NHEAD; ++n) {
      s[n] = -INFINITY, r[n] = 0.0f;
      if (!padded) {
        const T* key = k + n * p.k_stride_head + pos * p.k_stride_pos;
        float dot = 0.0f;
        for (int d = 0; d < head_dim; ++d) dot += q_s[n * head_dim + d] * to_float(key[d]);
        s[n] = dot;
      }
    }
    if (refine) {  // uniform across the block: the barriers below are safe
      float conv[kDC];
#pragma unroll
      for (int d = 0; d < kDC; ++d) conv[d] = 0.0f;
      const int64_t y = pos / width, x = pos % width;
      const int64_t patch_start = start - kPad * width - kPad, patch_len = kThreads + 2 * kPad * width + 2 * kPad;
      for (int c = 0; c < p.channels; ++c) {
        __syncthreads();  // the previous channel's patch and weights are consumed
        const float* plane = coverage + c * L;
        for (int64_t i = tid; i < patch_len; i += kThreads) {
          const int64_t g = patch_start + i;
          patch_s[i] = (g >= 0 && g < L) ? plane[g] : 0.0f;
        }
        for (int i = tid; i < kTaps * kDC; i += kThreads) {
          const int tap = i / kDC, d = i % kDC;
          weight_s[i] = p.conv_weight[(d * p.channels + c) * kTaps + tap];
        }
        __syncthreads();
        if (in_range) {
          for (int dy = 0; dy < kKernelSize; ++dy) {
            if (y + dy - kPad < 0 || y + dy - kPad >= p.height) continue;
            for (int dx = 0; dx < kKernelSize; ++dx) {
              if (x + dx - kPad < 0 || x + dx - kPad >= width) continue;
              // patch index of (y + dy - kPad, x + dx - kPad) relative to patch_start
              const float value = patch_s[tid + dy * width + dx];
              // 16-byte broadcast reads: a tap's kDC weights start on a 16-byte boundary
              const float4* w = reinterpret_cast<const float4*>(weight_s + (dy * kKernelSize + dx) * kDC);
#pragma unroll
              for (int d = 0; d < kDC / 4; ++d) {
                const float4 w4 = w[d];
                conv[4 * d] += w4.x * value, conv[4 * d + 1] += w4.y * value;
                conv[4 * d + 2] += w4.z * value, conv[4 * d + 3] += w4.w * value;
              }
            }
          }
        }
      }
      if (!padded) {
#pragma unroll
        for (int n = 0; n < NHEAD; ++n) r[n] = shift_s[n];
#pragma unroll
        for (int d = 0; d < kDC; ++d) {
          const float hidden = fmaxf(conv[d] + bias_s[d], 0.0f);
#pragma unroll
          for (int n = 0; n < NHEAD; ++n) r[n] += proj_s[n * kDC + d] * hidden;
        }
      }
    }
#pragma unroll
    for (int n = 0; n < NHEAD; ++n) {
      const float t = padded ? -INFINITY : s[n] - r[n];
      if (!padded) {
        add_sample(max_s[n], sum_s[n], s[n]);
        add_sample(max_t[n], sum_t[n], t);
      }
      if (in_range) {
        if (scores != nullptr) scores[n * L + pos] = s[n];
        refined[n * L + pos] = t;
      }
    }
  }

  // Block-wide merge of the statistics: warp shuffles, then across warps in shared memory.
#pragma unroll
  for (int n = 0; n < NHEAD; ++n) {
    for (int offset = 16; offset > 0; offset >>= 1) {
      merge_stats(max_s[n], sum_s[n], __shfl_xor_sync(0xffffffffu, max_s[n], offset), __shfl_xor_sync(0xffffffffu, sum_s[n], offset));
      merge_stats(max_t[n], sum_t[n], __shfl_xor_sync(0xffffffffu, max_t[n], offset), __shfl_xor_sync(0xffffffffu, sum_t[n], offset));
    }
    if (lane == 0) {
      float* slot = stats_s + (warp * NHEAD + n) * 4;
      slot[0] = max_s[n], slot[1] = sum_s[n], slot[2] = max_t[n], slot[3] = sum_t[n];
    }
  }
  __syncthreads();  // also: every conv read of the coverage precedes the updates below
#pragma unroll
  for (int n = 0; n < NHEAD; ++n) {
    max_s[n] = max_t[n] = kStartMax, sum_s[n] = sum_t[n] = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      const float* slot = stats_s + (w * NHEAD + n) * 4;
      merge_stats(max_s[n], sum_s[n], slot[0], slot[1]);
      merge_stats(max_t[n], sum_t[n], slot[2], slot[3]);
    }
  }

  // Each thread rewrites the positions it wrote in pass 1; the coverage updates come after
  // the barrier above, so no conv (whose halo reaches other threads' positions) sees them.
  float* self_coverage = p.update_self ? coverage + (p.channels - NHEAD) * L : nullptr;
  float* cross_coverage = p.prev_attn != nullptr ? coverage : nullptr;
  const float* prev_attn = p.prev_attn != nullptr ? p.prev_attn + row * NHEAD * L : nullptr;
  for (int64_t pos = tid; pos < L; pos += kThreads) {
#pragma unroll
    for (int n = 0; n < NHEAD; ++n) {
      refined[n * L + pos] = __expf(refined[n * L + pos] - max_t[n]) / sum_t[n];
      if (self_coverage != nullptr) self_coverage[n * L + pos] += __expf(scores[n * L + pos] - max_s[n]) / sum_s[n];
      if (cross_coverage != nullptr) cross_coverage[n * L + pos] += prev_attn[n * L + pos];
    }
  }
  __syncthreads();  // A' in `returned` is read across warps below

  // A'V: warp w takes head w % NHEAD and every slices-th position from w / NHEAD.
  const int slices = NHEAD >= kWarps ? 1 : kWarps / NHEAD;
  for (int task = warp; task < NHEAD * slices; task += kWarps) {
    const int n = task % NHEAD, slice = task / NHEAD;
    float acc[kDimsPerLane] = {};
    const T* values = v + n * p.v_stride_head;
    const float* probs = refined + n * L;
    for (int64_t pos = slice; pos < L; pos += slices) {
      const float prob = probs[pos];
      if (prob == 0.0f) continue;  // padding
#pragma unroll
      for (int j = 0; j < kDimsPerLane; ++j) {
        const int d = lane + 32 * j;
        if (d < head_dim) acc[j] += prob * to_float(values[pos * p.v_stride_pos + d]);
      }
    }
    if (slices == 1) {
#pragma unroll
      for (int j = 0; j < kDimsPerLane; ++j)
        if (lane + 32 * j < head_dim) out[n * head_dim + lane + 32 * j] = from_float<T>(acc[j]);
    } else {
#pragma unroll
      for (int j = 0; j < kDimsPerLane; ++j)
        if (lane + 32 * j < head_dim) partial_s[warp * kMaxHeadDim + lane + 32 * j] = acc[j];
    }
  }
  if (slices > 1) {  // slices of one head summed in a fixed order: deterministic
    __syncthreads();
    for (int i = tid; i < NHEAD * head_dim; i += kThreads) {
      const int n = i / head_dim, d = i % head_dim;
      float total = 0.0f;
      for (int slice = 0; slice < slices; ++slice) total += partial_s[(slice * NHEAD + n) * kMaxHeadDim + d];
      out[i] = from_float<T>(total);
    }
  }
}

}  // namespace
}  // namespace fastcomer
