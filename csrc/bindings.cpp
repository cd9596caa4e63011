// Python bindings of the CUDA kernels: device pointers, sizes and the stream travel as
// integers, so the module depends on neither torch's C++ ABI nor its version.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "decode_step.h"

namespace py = pybind11;

namespace {

template <typename T>
T* pointer(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void decode_step(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t key_padding_mask,
                 std::uintptr_t image_index, bool image_index_int64, std::uintptr_t coverage, int64_t coverage_stride_row,
                 std::uintptr_t prev_attn, bool update_self, std::uintptr_t conv_weight, std::uintptr_t conv_bias,
                 std::uintptr_t proj_weight, std::uintptr_t shift, std::uintptr_t scratch, std::uintptr_t returned,
                 std::uintptr_t out, std::uintptr_t stats, std::uintptr_t partial, int dtype,
                 int64_t rows, int64_t nhead, int64_t head_dim, int64_t length, int64_t height, int64_t channels, int64_t dc,
                 int64_t q_stride_row, int64_t q_stride_head, int64_t k_stride_image, int64_t k_stride_head,
                 int64_t k_stride_pos, int64_t v_stride_image, int64_t v_stride_head, int64_t v_stride_pos,
                 int64_t mask_stride_image, int64_t rows_per_slot, int64_t split_length, int64_t splits,
                 int64_t tile_length, bool vectorized_q, bool vectorized_kv, std::uintptr_t stream) {
  fastcomer::DecodeStepParams p;
  p.q = pointer<const void>(q);
  p.k = pointer<const void>(k);
  p.v = pointer<const void>(v);
  p.key_padding_mask = pointer<const uint8_t>(key_padding_mask);
  p.image_index = pointer<const void>(image_index);
  p.image_index_int64 = image_index_int64;
  p.coverage = pointer<float>(coverage);
  p.coverage_stride_row = coverage_stride_row;
  p.prev_attn = pointer<const float>(prev_attn);
  p.update_self = update_self;
  p.conv_weight = pointer<const float>(conv_weight);
  p.conv_bias = pointer<const float>(conv_bias);
  p.proj_weight = pointer<const float>(proj_weight);
  p.shift = pointer<const float>(shift);
  p.scratch = pointer<float>(scratch);
  p.returned = pointer<float>(returned);
  p.out = pointer<void>(out);
  p.stats = pointer<float>(stats);
  p.partial = pointer<float>(partial);
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("fastcomer._C.decode_step: dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  p.dtype = static_cast<fastcomer::DType>(dtype);
  p.rows = rows, p.nhead = nhead, p.head_dim = head_dim, p.length = length, p.height = height;
  p.width = height > 0 ? length / height : 0;
  p.channels = channels, p.dc = dc;
  p.q_stride_row = q_stride_row, p.q_stride_head = q_stride_head;
  p.k_stride_image = k_stride_image, p.k_stride_head = k_stride_head, p.k_stride_pos = k_stride_pos;
  p.v_stride_image = v_stride_image, p.v_stride_head = v_stride_head, p.v_stride_pos = v_stride_pos;
  p.mask_stride_image = mask_stride_image;
  p.rows_per_slot = rows_per_slot, p.split_length = split_length, p.splits = splits, p.tile_length = tile_length;
  p.vectorized_q = vectorized_q, p.vectorized_kv = vectorized_kv;
  py::gil_scoped_release release;
  fastcomer::launch_decode_step(p, pointer<void>(stream));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcomer's CUDA kernels (raw device pointers; see fastcomer/ops/decode_step/cuda_kernel.py)";
  m.def("decode_step", &decode_step,
        "One layer's fused decode step for all rows (cross-attention with the ARM): writes out and returned "
        "(A'), adds prev_attn and A to the coverage after refining with it; pointers are device addresses "
        "(0 = absent), strides count elements, stream is a cudaStream_t; stats and partial are the split's "
        "scratch buffers and rows_per_slot, split_length, splits, tile_length the split of L "
        "(fastcomer.ops.decode_step.interface.launch_plan).",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_padding_mask"), py::arg("image_index"),
        py::arg("image_index_int64"), py::arg("coverage"), py::arg("coverage_stride_row"), py::arg("prev_attn"),
        py::arg("update_self"), py::arg("conv_weight"), py::arg("conv_bias"), py::arg("proj_weight"), py::arg("shift"),
        py::arg("scratch"), py::arg("returned"), py::arg("out"), py::arg("stats"), py::arg("partial"), py::arg("dtype"), py::arg("rows"), py::arg("nhead"),
        py::arg("head_dim"), py::arg("length"),
        py::arg("height"), py::arg("channels"), py::arg("dc"), py::arg("q_stride_row"), py::arg("q_stride_head"),
        py::arg("k_stride_image"), py::arg("k_stride_head"), py::arg("k_stride_pos"), py::arg("v_stride_image"),
        py::arg("v_stride_head"), py::arg("v_stride_pos"), py::arg("mask_stride_image"), py::arg("rows_per_slot"),
        py::arg("split_length"), py::arg("splits"), py::arg("tile_length"), py::arg("vectorized_q"),
        py::arg("vectorized_kv"), py::arg("stream"));
  m.def("supported_shapes", &fastcomer::supported_shapes, "The shapes and dtypes this build's kernels accept.");
  m.attr("KERNEL_SIZE") = fastcomer::kKernelSize;
  m.def("build_info", &fastcomer::build_info, "CUDA runtime version and GPU architectures of this build.");
}
