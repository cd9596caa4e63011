// Runs csrc's decode-step kernels (float32) under cuda_emulation.h on arrays stored as raw
// files in the directory given as argv[1] (written by tests/ops/test_decode_step_cuda_kernel.py),
// with csrc's own launch plan: the grids run kernel after kernel, block after block.
#include "cuda_emulation.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "decode_step_kernel.cuh"

alignas(128) float decode_step_shared[1 << 20];

namespace {

std::string directory;

template <typename T>
std::vector<T> load(const std::string& name) {
  std::ifstream file(directory + "/" + name, std::ios::binary | std::ios::ate);
  std::vector<T> values(file ? static_cast<size_t>(file.tellg()) / sizeof(T) : 0);
  file.seekg(0);
  file.read(reinterpret_cast<char*>(values.data()), values.size() * sizeof(T));
  return values;
}

template <typename T>
void save(const std::string& name, const std::vector<T>& values) {
  std::ofstream(directory + "/" + name, std::ios::binary)
      .write(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

using Kernel = void (*)(fastcomer::DecodeStepParams);

// Every block of the grid, one after another, run by one team of kThreads threads (which
// meet between blocks); shared memory starts every block as NaN, so that a read of what no
// thread wrote shows in the results.
void run_grid(Kernel kernel, const fastcomer::KernelLaunch& launch, const fastcomer::DecodeStepParams& p) {
  std::barrier<> barrier(fastcomer::kThreads);
  emulated_block_barrier = &barrier;
  static_assert(fastcomer::kWarps == 4, "one warp barrier per warp");
  std::barrier<> warps[fastcomer::kWarps] = {std::barrier<>(32), std::barrier<>(32), std::barrier<>(32), std::barrier<>(32)};
  emulated_warp_barriers = warps;
  const auto team = [&](int t) {
    threadIdx.x = t;
    for (unsigned z = 0; z < launch.grid[2]; ++z)
      for (unsigned y = 0; y < launch.grid[1]; ++y)
        for (unsigned x = 0; x < launch.grid[0]; ++x) {
          if (t == 0) {
            std::fill_n(decode_step_shared, launch.shared_bytes / sizeof(float), std::numeric_limits<float>::quiet_NaN());
            blockIdx.x = x, blockIdx.y = y, blockIdx.z = z;
          }
          barrier.arrive_and_wait();  // the block is set up
          kernel(p);
          barrier.arrive_and_wait();  // the block is done
        }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < fastcomer::kThreads; ++t) threads.emplace_back(team, t);
  for (auto& thread : threads) thread.join();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  directory = argv[1];
  // rows nhead head_dim length height channels dc update_self has_coverage has_prev_attn image_index_int64
  // coverage_stride_row rows_per_slot split_length splits tile_length
  const auto meta = load<int64_t>("meta");
  auto q = load<float>("q"), k = load<float>("k"), v = load<float>("v");
  auto mask = load<uint8_t>("key_padding_mask");
  auto image_index = load<uint8_t>("image_index");
  auto coverage = load<float>("coverage");
  const auto prev_attn = load<float>("prev_attn");
  auto conv_weight = load<float>("conv_weight"), conv_bias = load<float>("conv_bias");
  auto proj_weight = load<float>("proj_weight"), shift = load<float>("shift");
  fastcomer::DecodeStepParams p;
  p.rows = meta[0], p.nhead = meta[1], p.head_dim = meta[2], p.length = meta[3], p.height = meta[4];
  p.width = p.length / p.height, p.channels = meta[5], p.dc = meta[6], p.update_self = meta[7];
  p.image_index_int64 = meta[10], p.coverage_stride_row = meta[11];
  p.rows_per_slot = meta[12], p.split_length = meta[13], p.splits = meta[14], p.tile_length = meta[15];
  p.vectorized_q = p.vectorized_kv = p.head_dim % 4 == 0;  // the arrays are contiguous and aligned
  std::vector<float> scratch(p.rows * p.nhead * p.length, 54321.0f), out(p.rows * p.nhead * p.head_dim, 12345.0f);
  std::vector<float> returned(p.rows * p.nhead * p.length, 12345.0f);
  std::vector<float> stats(p.rows * p.nhead * p.splits * 4, 54321.0f), partial(p.rows * p.nhead * p.splits * p.head_dim, 54321.0f);
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.key_padding_mask = mask.data(), p.image_index = image_index.data();
  p.coverage = meta[8] ? coverage.data() : nullptr, p.prev_attn = meta[9] ? prev_attn.data() : nullptr;
  p.conv_weight = conv_weight.data(), p.conv_bias = conv_bias.data(), p.proj_weight = proj_weight.data(), p.shift = shift.data();
  p.scratch = p.update_self ? scratch.data() : nullptr, p.returned = returned.data(), p.out = out.data();
  p.stats = stats.data(), p.partial = partial.data();
  p.q_stride_row = p.nhead * p.head_dim, p.q_stride_head = p.head_dim;
  p.k_stride_image = p.v_stride_image = p.nhead * p.length * p.head_dim;
  p.k_stride_head = p.v_stride_head = p.length * p.head_dim;
  p.k_stride_pos = p.v_stride_pos = p.head_dim, p.mask_stride_image = p.length;
  const fastcomer::DecodeStepLaunches plan = fastcomer::plan_launches(p);
  if (plan.refinement.grid[0] > 0) run_grid(fastcomer::refinement_kernel, plan.refinement, p);
  run_grid(fastcomer::partial_attention_kernel<float>, plan.partial_attention, p);
  run_grid(fastcomer::merge_kernel<float>, plan.merge, p);
  save("out", out);
  save("coverage_out", coverage);
  save("returned", returned);
  return 0;
}
