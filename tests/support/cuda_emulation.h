// The CUDA built-ins csrc/cross_attention_step_kernel.cuh uses, on the host: a block runs as
// kThreads std::threads meeting at a std::barrier, so the kernels' logic (indexing,
// barriers, the shuffle reductions, the wmma tiles) is checked on machines without a GPU.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(bytes) __attribute__((aligned(bytes)))

struct float4 {
  float x, y, z, w;
};

struct EmulatedIndex {
  int64_t x = 0, y = 0, z = 0;
};
inline thread_local EmulatedIndex threadIdx;
inline EmulatedIndex blockIdx;
inline std::barrier<>* emulated_block_barrier = nullptr;
inline std::barrier<>* emulated_warp_barriers = nullptr;  // one per warp of the block, 32 threads each
inline float emulated_shuffle_slots[1024];

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }

// Every lane of the warp calls it (as in the kernel), so the warp's barrier stands in for its
// lock-step exchange.
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  std::barrier<>& warp = emulated_warp_barriers[threadIdx.x / 32];
  emulated_shuffle_slots[threadIdx.x] = value;
  warp.arrive_and_wait();
  const float other = emulated_shuffle_slots[threadIdx.x ^ lane_mask];
  warp.arrive_and_wait();
  return other;
}

inline float __expf(float x) { return std::exp(x); }

// Half types only so that the kernel's conversions compile; the emulation runs float32.
struct __half { float value; };
struct __nv_bfloat16 { float value; };
inline float __half2float(__half h) { return h.value; }
inline float __bfloat162float(__nv_bfloat16 h) { return h.value; }
inline __half __float2half(float f) { return {f}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return {f}; }

// The warp-collective wmma tiles, float sources only: every thread of a warp holds the whole
// tile (num_elements = rows x cols, element-wise code treats them alike) and lane 0 stores it.
// TF32 rounding is emulated (round to nearest, ties away from zero, as cvt.rna.tf32.f32), so
// the 3xTF32 products are checked at their real accuracy.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const float* p, unsigned ld) {
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = std::is_same_v<Layout, col_major> ? p[c * ld + r] : p[r * ld + c];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ld, layout_t layout) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ld + c] : p[c * ld + r]) = f.x[r * N + c];
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  for (float& x : f.x) x = value;
}

template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float result[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float sum = c.x[m * N + n];
      for (int k = 0; k < K; ++k) sum += a.x[m * K + k] * b.x[k * N + n];
      result[m * N + n] = sum;
    }
  std::memcpy(d.x, result, sizeof(result));
}

inline float __float_to_tf32(float x) {
  if (!std::isfinite(x)) return x;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits = (bits + 0x1000u) & 0xffffe000u;  // 10 mantissa bits left, rounded on the magnitude
  std::memcpy(&x, &bits, sizeof(bits));
  return x;
}
}  // namespace wmma
}  // namespace nvcuda
