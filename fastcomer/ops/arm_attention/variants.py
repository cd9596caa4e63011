"""The fused ARM attention's Triton launches of one training step, for the static GPU report
(`fastcomer.kernel_report`, `python -m fastcomer kernels`).

`kernel_variants(shapes, arch)` lists every kernel variant that one CoMER decoder layer with
ARM ('both' coverage, BatchNorm in training, attention dropout) launches in its forward and
backward, per dtype mode, with the launch's grid, its FLOPs and its unique global bytes:
what the report compiles and costs. The tile sizes and flags come from the launchers
(`triton_kernel`), so the report compiles what the library launches.

Shape sets: 'published' is CoMER's training batch (`fastcomer.shapes`: 16 images x 8 heads, head
dim 32, dc 32, target length up to 200, feature maps of 32x32 and 50x50 = 2500 positions, not a
multiple of 16); 'small' is a CI-sized one (2 images, 5x10 map, 8 steps) with the same tile sizes.
"""
from typing import Dict, List, NamedTuple

import torch

from ...model.arm import CONV_TAPS, CoverageMode
from ...shapes import DC, HEAD_DIM, MAX_LEN, NHEAD, TRAIN_BATCH, TRAIN_FEATURE_MAPS
from ..registry import KernelVariant
from . import triton_kernel as K
from .triton_kernel import ARM_NUM_WARPS, ROW_NUM_WARPS, arm_blocks, arm_dot_precision, attention_blocks

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


def _signature(kernel, pointers: Dict[str, str], constexprs: dict) -> dict:
    """Argument types as triton.compiler.ASTSource takes them: pointers as given, the RNG offset
    int64, the dropout probability fp32, other scalars int32, constexprs marked."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "i64" if name == "rng_offset" else "fp32" if name == "p_drop" else "i32"
    return signature


def _variant(op, name, kernel, pointers, constexprs, grid, flops, bytes_, dtype, ints, num_warps=4,
             num_stages=3) -> KernelVariant:
    return KernelVariant(op, name, kernel, _signature(kernel, pointers, constexprs), constexprs, num_warps, num_stages,
                         grid, 1, float(flops), float(bytes_), dtype, ints)


def _layer_variants(shape: ArmShape, mode: str) -> List[KernelVariant]:
    dtype, precision, conv_policy = DTYPE_MODES[mode]
    e = _BYTES[dtype]
    b, H, D, dc, T, L = shape.images, shape.nhead, shape.head_dim, shape.dc, shape.steps, shape.keys
    BH = b * H
    cin = COVERAGE.channels(H)
    conv_precision = arm_dot_precision(_TORCH_DTYPES[dtype], conv_policy)
    blocks = attention_blocks(D, L)
    arm = arm_blocks(H, dc, cin, L)
    tag = f"{mode} T={T} L={L}"
    ints = {"T": T, "L": L, "D": D, "H": H, "WIDTH": shape.width, "HEIGHT": shape.height, "DC": dc, "CIN": cin,
            "N_CROSS": H}
    row_grid = (BH, -(-T // blocks["BLOCK_T"]), 1)
    key_grid = (BH, -(-L // blocks["BLOCK_L"]), 1)
    arm_grid = (b, -(-L // arm["BLOCK_L"]), 1)
    qkd = BH * T * L * D  # one [T, D] x [D, L] product per head row: 2 qkd FLOPs
    attn = BH * T * L  # elements of one attention-shaped tensor
    td, ld = BH * T * D, BH * L * D
    ptr = {n: "*" + dtype for n in ("Q", "K", "V", "Out", "Attn", "DOut", "DAttn", "DK", "DV", "Prev")}
    ptr.update({n: "*fp32" for n in ("Z", "Scale", "Shift", "Mean", "Lse", "DS", "DQ", "Stats", "DA", "Curr", "ConvW",
                                      "ConvB", "ProjW", "CoefDZ", "DPrev", "DCurr", "DConvW", "DConvB", "DProjW")})
    ptr.update(Mask="*u8", Relu="*i32")
    conv = 2 * dc * cin * CONV_TAPS * b * L * max(T - 1, 0)  # conv5x5 of every step's attention
    proj = 2 * H * dc * b * L * T
    arm_warps = dict(num_warps=ARM_NUM_WARPS)
    row_warps = dict(num_warps=ROW_NUM_WARPS)
    out = []
    flags = dict(DROPOUT=True, PRECISION=precision, **blocks)
    # forward
    out.append(_variant("arm_attention.forward", f"attention_rows unrefined {tag}", K.attention_rows_kernel,
                        dict(ptr, Attn="*fp32"), dict(HAS_R=False, WRITE_OUT=False, WRITE_LSE=False, **flags),
                        row_grid, 4 * qkd, td * e + ld * e + attn * 4 + b * L, mode, ints, **row_warps))
    arm_flags = dict(PRECISION=conv_precision, **arm)
    out.append(_variant("arm_attention.forward", f"coverage_projection {tag}", K.coverage_projection_kernel, ptr,
                        dict(STATS=True, WRITE_RELU=True, **arm_flags), arm_grid, conv + proj,
                        attn * (e + 4 + 4) + b * T * L * 4 + b * L, mode, ints, **arm_warps))
    out.append(_variant("arm_attention.forward", f"attention_rows refined {tag}", K.attention_rows_kernel, ptr,
                        dict(HAS_R=True, WRITE_OUT=True, WRITE_LSE=True, **flags), row_grid, 6 * qkd,
                        2 * td * e + 2 * ld * e + attn * (4 + e) + BH * T * 4 + b * L, mode, ints, **row_warps))
    # backward
    out.append(_variant("arm_attention.backward", f"attention_backward_rows {tag}", K.attention_backward_rows_kernel,
                        ptr, dict(HAS_R=True, HAS_DATTN=True, **flags), row_grid, 10 * qkd,
                        2 * td * e + 2 * ld * e + attn * (4 + e + 4) + td * 4 + b * L, mode, ints, **row_warps))
    out.append(_variant("arm_attention.backward", f"attention_rows unrefined+lse {tag}", K.attention_rows_kernel,
                        dict(ptr, Attn="*fp32"), dict(HAS_R=False, WRITE_OUT=False, WRITE_LSE=True, **flags),
                        row_grid, 4 * qkd, td * e + ld * e + attn * 4 + BH * T * 4 + b * L, mode, ints, **row_warps))
    # the conv twice (the sum over steps, then removed step by step) and conv^T; d proj and
    # proj^T dZ at the tile and its 25 neighbours
    out.append(_variant("arm_attention.backward", f"arm_backward {tag}", K.arm_backward_kernel, ptr, arm_flags,
                        arm_grid, 3 * conv + proj * (2 + CONV_TAPS),
                        attn * (e + 4 + 4 + 4 + 4 + 4) + b * T * L * 4 + b * L, mode, ints, **arm_warps))
    # per tap: G_t X_t^T, and proj^T dZ rebuilt at the tile (25 times over; reads shared in L2)
    out.append(_variant("arm_attention.backward", f"arm_weight_grad {tag}", K.arm_weight_grad_kernel, ptr,
                        arm_flags, (CONV_TAPS, arm_grid[0], arm_grid[1]), conv + CONV_TAPS * proj,
                        attn * (e + 4 + 4 + 4) + b * T * L * 4 + b * L, mode, ints, **arm_warps))
    out.append(_variant("arm_attention.backward", f"unrefined_backward_rows {tag}",
                        K.unrefined_backward_rows_kernel, ptr, dict(DROPOUT=True, PRECISION=precision, **blocks),
                        row_grid, 6 * qkd, td * e + ld * e + attn * (4 + 4 + 4) + td * 4 * 2 + b * L, mode, ints, **row_warps))
    out.append(_variant("arm_attention.backward", f"attention_backward_keys {tag}",
                        K.attention_backward_keys_kernel, ptr, dict(PRECISION=precision, **blocks), key_grid,
                        4 * qkd, 2 * td * e + attn * (e + 4) + 2 * ld * e, mode, ints))
    return out


def kernel_variants(shapes: str, arch: int) -> List[KernelVariant]:
    """Every Triton kernel variant one ARM decoder layer launches in training (forward and
    backward), for each dtype mode and shape of the set `shapes` ('published' or 'small').
    `arch` (80, 90) does not change the launch configuration yet."""
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {sorted(SHAPES)}, got {shapes!r}")
    del arch  # one launch configuration for sm_80 and sm_90
    return [v for shape in SHAPES[shapes] for mode in DTYPE_MODES for v in _layer_variants(shape, mode)]
