// Runs csrc's cross-attention step kernels (float32) under cuda_emulation.h on the launch
// fields stored in the directory given as argv[1] by tests/ops/test_cross_attention_step_cuda_kernel.py:
// `scalars` holds "name value" lines, and each pointer field present is a raw file of its name.
// Fields are set by name through csrc's one list of them (the X-macros of
// cross_attention_step.h); the grids of csrc's own launch plan run kernel after kernel, block
// after block. `out`, `returned` and `coverage` are written back as NAME.result.
#include "cuda_emulation.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cross_attention_step_kernel.cuh"

alignas(128) float cross_attention_step_shared[1 << 20];

namespace {

std::string directory;

// A field's file as floats (a uint8 mask or int32 index padded to whole floats); empty when absent.
std::vector<float> load(const std::string& name) {
  std::ifstream file(directory + "/" + name, std::ios::binary | std::ios::ate);
  if (!file) return {};
  const std::streamsize bytes = file.tellg();
  std::vector<float> values((static_cast<size_t>(bytes) + sizeof(float) - 1) / sizeof(float));
  file.seekg(0);
  file.read(reinterpret_cast<char*>(values.data()), bytes);
  return values;
}

void save(const std::string& name, const std::vector<float>& values) {
  std::ofstream(directory + "/" + name, std::ios::binary)
      .write(reinterpret_cast<const char*>(values.data()), static_cast<std::streamsize>(values.size() * sizeof(float)));
}

template <typename T>
void parse(T& field, const std::string& text) {
  field = static_cast<T>(std::stoll(text));
}
void parse(fastcomer::DType& field, const std::string& text) { field = static_cast<fastcomer::DType>(std::stoi(text)); }

using Kernel = void (*)(fastcomer::CrossAttentionStepParams);

// Every block of the grid, one after another, run by one team of kThreads threads (which
// meet between blocks); shared memory starts every block as NaN, so that a read of what no
// thread wrote shows in the results.
void run_grid(Kernel kernel, const fastcomer::KernelLaunch& launch, const fastcomer::CrossAttentionStepParams& p) {
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
            std::fill_n(cross_attention_step_shared, launch.shared_bytes / sizeof(float), std::numeric_limits<float>::quiet_NaN());
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
  std::map<std::string, std::string> scalars;
  std::ifstream lines(directory + "/scalars");
  for (std::string name, value; lines >> name >> value;) scalars[name] = value;
  fastcomer::CrossAttentionStepParams p;
  std::map<std::string, std::vector<float>> buffers;
#define FASTCOMER_LOAD_POINTER(type, name, value)                                       \
  buffers[#name] = load(#name);                                                         \
  p.name = buffers[#name].empty() ? nullptr : reinterpret_cast<type>(buffers[#name].data());
#define FASTCOMER_PARSE_SCALAR(type, name, value)                                         \
  if (!scalars.count(#name)) throw std::invalid_argument("scalars lacks " #name);        \
  parse(p.name, scalars.at(#name));                                                       \
  scalars.erase(#name);
  FASTCOMER_CROSS_ATTENTION_STEP_POINTERS(FASTCOMER_LOAD_POINTER)
  FASTCOMER_CROSS_ATTENTION_STEP_SCALARS(FASTCOMER_PARSE_SCALAR)
  if (!scalars.empty()) throw std::invalid_argument("unknown scalar field " + scalars.begin()->first);
  const fastcomer::CrossAttentionStepLaunches plan = fastcomer::plan_launches(p);
  if (plan.refinement.grid[0] > 0) run_grid(fastcomer::refinement_kernel, plan.refinement, p);
  run_grid(fastcomer::partial_attention_kernel<float>, plan.partial_attention, p);
  run_grid(fastcomer::merge_kernel<float>, plan.merge, p);
  for (const char* name : {"out", "returned", "coverage"}) save(std::string(name) + ".result", buffers[name]);
  return 0;
}
