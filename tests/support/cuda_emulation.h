// The CUDA built-ins csrc/decode_step_kernel.cuh uses, on the host: a block runs as
// kThreads std::threads meeting at a std::barrier, so the kernel's logic (indexing,
// barriers, the shuffle reductions) is checked on machines without a GPU.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __align__(bytes) __attribute__((aligned(bytes)))

struct float4 {
  float x, y, z, w;
};

struct EmulatedIndex {
  int64_t x = 0;
};
inline thread_local EmulatedIndex threadIdx;
inline EmulatedIndex blockIdx;
inline std::barrier<>* emulated_block_barrier = nullptr;
inline float emulated_shuffle_slots[1024];

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }

// Every thread of the block calls it (as in the kernel), so a block-wide barrier stands in
// for the warp's lock-step exchange.
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  emulated_shuffle_slots[threadIdx.x] = value;
  __syncthreads();
  const float other = emulated_shuffle_slots[threadIdx.x ^ lane_mask];
  __syncthreads();
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
