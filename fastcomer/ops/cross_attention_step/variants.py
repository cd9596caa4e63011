"""The cross-attention step's Triton kernels at the shapes the static kernel report covers: what to
compile (kernel, signature, constexprs, warps) and what one launch does (grid, FLOPs, unique
global bytes), without a GPU.

Shapes "published" (`fastcomer.shapes`): CoMER's decoder (nhead 8, head_dim 32, dc 32, coverage
cross + self) at 1 and 16 images of 2 directions x 10 beams (20 rows per image), L = 256 and 1024
(the feature maps of the 128x512 and 256x1024 images), in float32,
bfloat16 and float16: the call of a refining layer, whose three kernels each launch once per
layer step. Shapes "small": one image, L = 64, float32 and bfloat16, for CI.
"""
from typing import Dict, List

from ...model.arm import CONV_TAPS
from ...shapes import BEAM_SIZE, DC, FEATURE_LENGTHS, HEAD_DIM, NHEAD, ROWS_PER_IMAGE
from ..registry import KernelVariant
from .inputs import CoverageFlags, CrossAttentionStepShape
from .launch import launch_plan
from .triton_kernel import STATS, _merge_kernel, _partial_attention_kernel, _refinement_kernel, kernel_constants

__all__ = ["kernel_variants", "PUBLISHED", "ROWS_PER_IMAGE"]

CHANNELS = 2 * NHEAD  # coverage cross + self
BEAMS = BEAM_SIZE  # the engine's G: a direction's beams read one copy of the image's K/V
SHAPES = {
    "published": dict(images=(1, 16), lengths=FEATURE_LENGTHS, dtypes=("fp32", "bf16", "fp16")),
    "small": dict(images=(1,), lengths=(64,), dtypes=("fp32", "bf16")),
}
PUBLISHED = SHAPES["published"]
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
F32 = 4


def _signature(kernel, pointers: Dict[str, str], constexprs: Dict[str, object]) -> Dict[str, str]:
    """ASTSource's signature: the given pointer types, "constexpr" for the constexprs, i32 for
    the sizes and strides (all < 2**31 at these shapes)."""
    return {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in kernel.arg_names}


def _variant(kernel, role: str, label: str, pointers, constexprs, grid, flops: float, nbytes: float, dtype: str,
             num_warps: int = 4) -> KernelVariant:
    return KernelVariant("cross_attention_step", f"{role}[{label}]", kernel, _signature(kernel, pointers, constexprs),
                         constexprs, num_warps, 1, grid, 1, float(flops), float(nbytes), dtype)


def _call_variants(images: int, length: int, dtype: str) -> List[KernelVariant]:
    """The three kernels of one refining layer's call (coverage cross + self)."""
    rows = images * ROWS_PER_IMAGE
    kv_images = rows // BEAMS  # the engine keeps one K/V copy per direction
    plan = launch_plan(rows, NHEAD, length, BEAMS)
    refine_grid, attention_grid, merge_grid = plan.grids(rows, NHEAD, refine=True)
    shape = CrossAttentionStepShape(rows, kv_images, NHEAD, HEAD_DIM, length, 1, length, CHANNELS, DC)
    constants = kernel_constants(shape, CoverageFlags(refine=True, update_cross=True, update_self=True), plan)
    label = f"images={images},L={length},{dtype}"
    element = ELEMENT_BYTES[dtype]
    attention_map = rows * NHEAD * length * F32  # one float32 [rows, nhead, L] tensor
    split_stats = rows * NHEAD * plan.splits * (STATS + HEAD_DIM) * F32
    mask_bytes = kv_images * length
    pointer_types = {"mask_ptr": "*u8", "image_index_ptr": "*i32"}
    f32_pointers = lambda names: {name: "*fp32" for name in names}

    refinement = _variant(
        _refinement_kernel, "refinement", label,
        {**pointer_types, **f32_pointers(("coverage_ptr", "conv_weight_ptr", "conv_bias_ptr", "proj_weight_ptr",
                                          "shift_ptr", "refinement_ptr"))},
        constants.refinement,
        refine_grid,
        flops=rows * length * 2 * (CONV_TAPS * CHANNELS * DC + DC * NHEAD),
        nbytes=rows * CHANNELS * length * F32 + DC * CHANNELS * CONV_TAPS * F32 + mask_bytes + attention_map,
        dtype="fp32")
    attention = _variant(
        _partial_attention_kernel, "partial_attention", label,
        {**pointer_types, **{name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr")},
         **f32_pointers(("scratch_ptr", "returned_ptr", "stats_ptr", "partial_ptr"))},
        constants.partial_attention,
        attention_grid,
        flops=rows * NHEAD * length * 2 * 2 * HEAD_DIM,  # S = q.K and P.V
        nbytes=(2 * kv_images * NHEAD * length * HEAD_DIM + rows * NHEAD * HEAD_DIM) * element + mask_bytes
        + 3 * attention_map + split_stats,  # R read; S - R and S written
        dtype=dtype)
    merge = _variant(
        _merge_kernel, "merge", label,
        {"image_index_ptr": "*i32", "out_ptr": f"*{dtype}",
         **f32_pointers(("coverage_ptr", "prev_attn_ptr", "scratch_ptr", "returned_ptr", "stats_ptr", "partial_ptr"))},
        constants.merge,
        merge_grid,
        flops=rows * NHEAD * (length * 6 + plan.splits * HEAD_DIM * 2),
        # returned and the coverage read and written, prev_attn and S read, every tile reading the statistics
        nbytes=2 * attention_map + 2 * rows * CHANNELS * length * F32 + 2 * attention_map
        + plan.tiles * rows * NHEAD * plan.splits * STATS * F32 + split_stats + rows * NHEAD * HEAD_DIM * element,
        dtype=dtype)
    return [refinement, attention, merge]


def kernel_variants(shapes: str, arch: int) -> List[KernelVariant]:
    """Every kernel launch of a refining layer's cross-attention step at `shapes` ("published" or
    "small"), as the kernel report compiles and rates it. arch (80, 90, ...) does not change
    the variants: the kernels take the same tiles on every architecture."""
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {sorted(SHAPES)}, got {shapes!r}")
    if not isinstance(arch, int) or arch < 80:
        raise ValueError(f"arch must be an int >= 80 (the kernels use sm_80 tensor-core dots), got {arch!r}")
    config = SHAPES[shapes]
    return [variant for images in config["images"] for length in config["lengths"] for dtype in config["dtypes"]
            for variant in _call_variants(images, length, dtype)]

