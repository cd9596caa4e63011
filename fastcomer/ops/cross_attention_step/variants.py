"""The cross-attention step's Triton kernels at the shapes the static kernel report covers: what to
compile (the launcher's own launches, recorded on meta tensors by `ops.triton_launch`) and what
one launch does (FLOPs, unique global bytes), without a GPU.

Shapes "published" (`fastcomer.shapes`): CoMER's decoder (nhead 8, head_dim 32, dc 32, coverage
cross + self) at 1 and 16 images of 2 directions x 10 beams (20 rows per image), L = 256 and 1024
(the feature maps of the 128x512 and 256x1024 images), in float32,
bfloat16 and float16: the call of a refining layer, whose three kernels each launch once per
layer step. Shapes "small": one image, L = 64, float32 and bfloat16, for CI.
"""
import math
from typing import Callable, List

import torch

from ...model.arm import CONV_TAPS, KERNEL_SIZE, CoverageMode, FoldedARM
from ...shapes import BEAM_SIZE, DC, FEATURE_LENGTHS, HEAD_DIM, NHEAD, ROWS_PER_IMAGE
from ..registry import KernelVariant
from ..triton_launch import recorded
from .inputs import CrossAttentionStepShape
from .launch import launch_plan
from .triton_kernel import STATS, cross_attention_step

__all__ = ["kernel_variants", "PUBLISHED", "ROWS_PER_IMAGE"]

CHANNELS = 2 * NHEAD  # coverage cross + self
BEAMS = BEAM_SIZE  # the engine's G: a direction's beams read one copy of the image's K/V
SHAPES = {
    "published": dict(images=(1, 16), lengths=FEATURE_LENGTHS, dtypes=("fp32", "bf16", "fp16")),
    "small": dict(images=(1,), lengths=(64,), dtypes=("fp32", "bf16")),
}
PUBLISHED = SHAPES["published"]
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
F32 = 4


def _recorded_launches(images: int, length: int, dtype: str, shape: CrossAttentionStepShape):
    """The launches of one refining layer's call (coverage cross + self), made by the launcher
    itself (`triton_kernel.cross_attention_step`) on meta tensors: recorded, not run. The model's
    tensors (q, K/V, the folded ARM) in `dtype`; the coverage and prev_attn float32, as the
    engine keeps them for the fused kernels."""
    meta = lambda *size, dtype=torch.float32: torch.empty(*size, device="meta", dtype=dtype)
    model = TORCH_DTYPES[dtype]
    rows = shape.rows
    arm = FoldedARM(meta(DC, CHANNELS, KERNEL_SIZE, KERNEL_SIZE, dtype=model), meta(DC, dtype=model),
                    meta(NHEAD, DC, dtype=model), meta(NHEAD, dtype=model), CoverageMode.BOTH)
    with recorded() as launches:
        cross_attention_step(
            meta(rows, NHEAD, HEAD_DIM, dtype=model), meta(shape.images, NHEAD, length, HEAD_DIM, dtype=model),
            meta(shape.images, NHEAD, length, HEAD_DIM, dtype=model), meta(shape.images, length, dtype=torch.bool),
            meta(rows, dtype=torch.int32), shape.height, arm, meta(rows, CHANNELS, length), meta(rows, NHEAD, length),
            shape, rows_per_image=BEAMS)
    return launches


def _call_variants(images: int, length: int, dtype: str) -> List[KernelVariant]:
    """The three kernels of one refining layer's call (coverage cross + self)."""
    rows = images * ROWS_PER_IMAGE
    kv_images = rows // BEAMS  # the engine keeps one K/V copy per direction
    plan = launch_plan(rows, NHEAD, length, BEAMS)
    side = math.isqrt(length)  # a square feature map (16 x 16, 32 x 32, 8 x 8)
    shape = CrossAttentionStepShape(rows, kv_images, NHEAD, HEAD_DIM, length, side, length // side, CHANNELS, DC)
    label = f"images={images},L={length},{dtype}"
    element = ELEMENT_BYTES[dtype]
    attention_map = rows * NHEAD * length * F32  # one float32 [rows, nhead, L] tensor
    split_stats = rows * NHEAD * plan.splits * (STATS + HEAD_DIM) * F32
    mask_bytes = kv_images * length
    costs = [
        ("refinement", rows * length * 2 * (CONV_TAPS * CHANNELS * DC + DC * NHEAD),
         rows * CHANNELS * length * F32 + DC * CHANNELS * CONV_TAPS * element + mask_bytes + attention_map),
        ("partial_attention", rows * NHEAD * length * 2 * 2 * HEAD_DIM,  # S = q.K and P.V
         (2 * kv_images * NHEAD * length * HEAD_DIM + rows * NHEAD * HEAD_DIM) * element + mask_bytes
         + 3 * attention_map + split_stats),  # R read; S - R and S written
        # returned and the coverage read and written, prev_attn and S read, every tile reading the statistics
        ("merge", rows * NHEAD * (length * 6 + plan.splits * HEAD_DIM * 2),
         2 * attention_map + 2 * rows * CHANNELS * length * F32 + 2 * attention_map
         + plan.tiles * rows * NHEAD * plan.splits * STATS * F32 + split_stats + rows * NHEAD * HEAD_DIM * element),
    ]
    launches = _recorded_launches(images, length, dtype, shape)
    kernels = [launch.kernel.__name__ for launch in launches]
    if kernels != [f"_{role}_kernel" for role, _, _ in costs]:
        raise RuntimeError(f"the cross-attention step's launches changed: {kernels}")
    return [KernelVariant("cross_attention_step", f"{role}[{label}]", launch, 1, float(flops), float(nbytes), dtype)
            for (role, flops, nbytes), launch in zip(costs, launches)]


def per_decoding_shape(shapes: str, variant: Callable[[int, str], KernelVariant]) -> List[KernelVariant]:
    """variant(images, dtype) for every image count and dtype of the shape set `shapes`: the
    decoding steps' variants (this op's and the other steps') share its shapes."""
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {sorted(SHAPES)}, got {shapes!r}")
    return [variant(images, dtype) for images in SHAPES[shapes]["images"] for dtype in SHAPES[shapes]["dtypes"]]


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

