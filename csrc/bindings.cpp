// Python bindings of the CUDA kernels: device pointers, sizes and the stream travel as
// integers, so the module depends on neither torch's C++ ABI nor its version.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "cross_attention_step.h"

namespace py = pybind11;

namespace {

using fastcomer::CrossAttentionStepParams;
using fastcomer::DType;

// A pointer field reads and writes as the integer device address (0 = absent).
#define FASTCOMER_BIND_POINTER(type, name, value)                                                     \
  params.def_property(                                                                               \
      #name, [](const CrossAttentionStepParams& p) { return reinterpret_cast<std::uintptr_t>(p.name); }, \
      [](CrossAttentionStepParams& p, std::uintptr_t address) { p.name = reinterpret_cast<type>(address); });
#define FASTCOMER_BIND_SCALAR(type, name, value) params.def_readwrite(#name, &CrossAttentionStepParams::name);
#define FASTCOMER_FIELD_NAME(type, name, value) #name,

void cross_attention_step(const CrossAttentionStepParams& p, std::uintptr_t stream) {
  py::gil_scoped_release release;
  fastcomer::launch_cross_attention_step(p, reinterpret_cast<void*>(stream));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcomer's CUDA kernels (raw device pointers; see fastcomer/ops/cross_attention_step/cuda_kernel.py)";
  py::enum_<DType>(m, "DType")
      .value("float32", DType::kFloat32)
      .value("float16", DType::kFloat16)
      .value("bfloat16", DType::kBFloat16);
  py::class_<CrossAttentionStepParams> params(
      m, "CrossAttentionStepParams",
      "One layer's cross-attention step over all rows: device addresses (0 = absent), sizes, strides in elements, "
      "and the split of L (fastcomer.ops.cross_attention_step.launch.launch_plan); fields named in "
      "CROSS_ATTENTION_STEP_FIELDS.");
  params.def(py::init<>());
  FASTCOMER_CROSS_ATTENTION_STEP_POINTERS(FASTCOMER_BIND_POINTER)
  FASTCOMER_CROSS_ATTENTION_STEP_SCALARS(FASTCOMER_BIND_SCALAR)
  static const char* const kFieldNames[] = {FASTCOMER_CROSS_ATTENTION_STEP_POINTERS(FASTCOMER_FIELD_NAME)
                                                FASTCOMER_CROSS_ATTENTION_STEP_SCALARS(FASTCOMER_FIELD_NAME)};
  py::list field_names;
  for (const char* name : kFieldNames) field_names.append(name);
  m.attr("CROSS_ATTENTION_STEP_FIELDS") = py::tuple(field_names);
  m.def("cross_attention_step", &cross_attention_step,
        "One layer's fused cross-attention step with the ARM for all rows: writes out and returned (A'), adds "
        "prev_attn and A to the coverage after refining with it; stream is a cudaStream_t as an integer.",
        py::arg("params"), py::arg("stream"));
  m.def("supported_shapes", &fastcomer::supported_shapes, "The shapes and dtypes this build's kernels accept.");
  py::dict limits;
  limits["kernel_size"] = fastcomer::kKernelSize;
  limits["threads"] = fastcomer::kThreads;
  limits["max_heads"] = fastcomer::kMaxHeads;
  limits["dc"] = fastcomer::kDC;
  limits["max_head_dim"] = fastcomer::kMaxHeadDim;
  limits["tile"] = fastcomer::kTile;
  limits["max_tile"] = fastcomer::kMaxTile;
  limits["stats"] = fastcomer::kStats;
  m.attr("LIMITS") = limits;
  m.def("build_info", &fastcomer::build_info, "CUDA runtime version and GPU architectures of this build.");
}
