"""The fused ARM attention's Triton launches of one training step, for the static GPU report
(`fastcomer.kernel_report`, `python -m fastcomer kernels`).

`kernel_variants(shapes, arch)` lists every kernel variant that one CoMER decoder layer with
ARM ('both' coverage, BatchNorm in training, attention dropout) launches in its forward and
backward, per dtype mode, with its FLOPs and its unique global bytes: what the report
compiles and costs. The launches are the launcher's own (`triton_kernel.arm_attention` run on
meta tensors, its launches recorded by `ops.triton_launch`), so the report compiles what the
library launches.

Shape sets: 'published' is CoMER's training batch (`fastcomer.shapes`: 16 images x 8 heads, head
dim 32, dc 32, target length up to 200, feature maps of 32x32 and 50x50 = 2500 positions, not a
multiple of 16); 'small' is a CI-sized one (2 images, 5x10 map, 8 steps) with the same tile sizes.
"""
from typing import Dict, List, NamedTuple

import torch

from ...model.arm import CONV_TAPS, KERNEL_SIZE, CoverageMode
from ...shapes import DC, HEAD_DIM, MAX_LEN, NHEAD, TRAIN_BATCH, TRAIN_FEATURE_MAPS
from ..registry import KernelVariant
from ..triton_launch import recorded
from . import triton_kernel as K
from .inputs import ARMWeights

__all__ = ["ArmShape", "DTYPE_MODES", "SHAPES", "kernel_variants"]


class ArmShape(NamedTuple):
    """One layer call: images, heads, head dim, ARM channels, target steps, feature map."""

    images: int
    nhead: int
    head_dim: int
    dc: int
    steps: int
    height: int
    width: int

    @property
    def keys(self) -> int:
        return self.height * self.width


SHAPES: Dict[str, List[ArmShape]] = {
    "published": [ArmShape(TRAIN_BATCH, NHEAD, HEAD_DIM, DC, MAX_LEN, h, w) for h, w in TRAIN_FEATURE_MAPS],
    "small": [ArmShape(2, NHEAD, HEAD_DIM, DC, 8, 5, 10)],
}

# dtype mode -> (Triton element type of q, k, v and the returned attention, precision of the
# attention matmuls, of the ARM conv and projection). "fp32" is eager PyTorch's default policy
# (cuBLAS without TF32, cuDNN's conv with it), which `arm_attention(precision=None)` follows.
DTYPE_MODES = {"fp32": ("fp32", "ieee", "tf32"), "fp32-ieee": ("fp32", "ieee", "ieee"),
               "fp32-tf32": ("fp32", "tf32", "tf32"), "bf16": ("bf16", "ieee", "ieee"),
               "fp16": ("fp16", "ieee", "ieee")}
COVERAGE = CoverageMode.BOTH
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Training's attention dropout and a seed that Triton specialises on nothing (not 1, not a
# multiple of 16): the report's launches are those of a typical step.
DROPOUT_P, SEED = 0.1, 12345


def _recorded_launches(shape: ArmShape, mode: str):
    """The launches of one layer call's forward and backward, made by the launcher itself
    (`triton_kernel.arm_attention`) on meta tensors: recorded, not run."""
    dtype, precision, conv_policy = DTYPE_MODES[mode]
    b, H, D, dc, T, L = shape.images, shape.nhead, shape.head_dim, shape.dc, shape.steps, shape.keys
    cin = COVERAGE.channels(H)
    meta = lambda *size, dtype=torch.float32, grad=True: torch.empty(*size, device="meta", dtype=dtype,
                                                                     requires_grad=grad)
    half = _TORCH_DTYPES[dtype]
    arm = ARMWeights(meta(dc, cin, KERNEL_SIZE, KERNEL_SIZE), meta(dc), meta(H, dc, 1, 1), meta(H), meta(H),
                     meta(H, grad=False), meta(H, grad=False), torch.zeros((), dtype=torch.long, device="meta"),
                     0.1, 1e-5, COVERAGE)
    q, k, v = meta(b * H, T, D, dtype=half), meta(b * H, L, D, dtype=half), meta(b * H, L, D, dtype=half)
    prev = meta(b * H, T, L, dtype=half)
    mask = torch.zeros(b, L, dtype=torch.bool, device="meta")
    with recorded() as launches:
        out, attn = K.arm_attention(q, k, v, mask, shape.height, shape.width, prev, arm, True, DROPOUT_P, SEED,
                                    precision, conv_policy)
        torch.autograd.backward((out, attn), (torch.empty_like(out), torch.empty_like(attn)))
    return launches


def _layer_variants(shape: ArmShape, mode: str) -> List[KernelVariant]:
    dtype = DTYPE_MODES[mode][0]
    e = _BYTES[dtype]
    b, H, D, dc, T, L = shape.images, shape.nhead, shape.head_dim, shape.dc, shape.steps, shape.keys
    BH = b * H
    cin = COVERAGE.channels(H)
    tag = f"{mode} T={T} L={L}"
    qkd = BH * T * L * D  # one [T, D] x [D, L] product per head row: 2 qkd FLOPs
    attn = BH * T * L  # elements of one attention-shaped tensor
    td, ld = BH * T * D, BH * L * D
    conv = 2 * dc * cin * CONV_TAPS * b * L * max(T - 1, 0)  # conv5x5 of every step's attention
    proj = 2 * H * dc * b * L * T
    forward, backward = "arm_attention.forward", "arm_attention.backward"
    # (op, name, FLOPs, unique bytes) of each launch, in the launcher's order
    costs = [
        (forward, "attention_rows unrefined", 4 * qkd, td * e + ld * e + attn * 4 + b * L),
        (forward, "coverage_projection", conv + proj, attn * (e + 4 + 4) + b * T * L * 4 + b * L),
        (forward, "attention_rows refined", 6 * qkd, 2 * td * e + 2 * ld * e + attn * (4 + e) + BH * T * 4 + b * L),
        (backward, "attention_backward_rows", 10 * qkd, 2 * td * e + 2 * ld * e + attn * (4 + e + 4) + td * 4 + b * L),
        (backward, "attention_rows unrefined+lse", 4 * qkd, td * e + ld * e + attn * 4 + BH * T * 4 + b * L),
        # the conv twice (the sum over steps, then removed step by step) and conv^T; d proj and
        # proj^T dZ at the tile and its 25 neighbours
        (backward, "arm_backward", 3 * conv + proj * (2 + CONV_TAPS),
         attn * (e + 4 + 4 + 4 + 4 + 4) + b * T * L * 4 + b * L),
        # per tap: G_t X_t^T, and proj^T dZ rebuilt at the tile (25 times over; reads shared in L2)
        (backward, "arm_weight_grad", conv + CONV_TAPS * proj, attn * (e + 4 + 4 + 4) + b * T * L * 4 + b * L),
        (backward, "unrefined_backward_rows", 6 * qkd, td * e + ld * e + attn * (4 + 4 + 4) + td * 4 * 2 + b * L),
        (backward, "attention_backward_keys", 4 * qkd, 2 * td * e + attn * (e + 4) + 2 * ld * e),
    ]
    launches = _recorded_launches(shape, mode)
    kernels = [launch.kernel.__name__ for launch in launches]
    expected = [name.split()[0] + "_kernel" for _, name, _, _ in costs]
    if kernels != expected:
        raise RuntimeError(f"the ARM launcher's launches changed: {kernels}, costed: {expected}")
    return [KernelVariant(op, f"{name} {tag}", launch, 1, float(flops), float(bytes_), mode)
            for (op, name, flops, bytes_), launch in zip(costs, launches)]


def kernel_variants(shapes: str, arch: int) -> List[KernelVariant]:
    """Every Triton kernel variant one ARM decoder layer launches in training (forward and
    backward), for each dtype mode and shape of the set `shapes` ('published' or 'small').
    `arch` (80, 90) does not change the launch configuration yet."""
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {sorted(SHAPES)}, got {shapes!r}")
    del arch  # one launch configuration for sm_80 and sm_90
    return [v for shape in SHAPES[shapes] for mode in DTYPE_MODES for v in _layer_variants(shape, mode)]
