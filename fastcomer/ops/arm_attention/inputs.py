"""What the fused ARM attention's entry and its Triton implementation share: the ARM's
weights as tensors (`ARMWeights`), the precisions, and the input checks."""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ...model.arm import KERNEL_SIZE, CoverageMode

PRECISIONS = ("ieee", "tf32")


class ARMWeights(NamedTuple):
    """The ARM's parameters and BatchNorm state, as tensors (shared, not copied)."""

    conv_weight: Tensor  # [dc, C, KERNEL_SIZE, KERNEL_SIZE], C = coverage.channels(nhead)
    conv_bias: Tensor  # [dc]
    proj_weight: Tensor  # [nhead, dc, 1, 1]
    bn_weight: Tensor  # [nhead]
    bn_bias: Tensor  # [nhead]
    running_mean: Tensor  # [nhead], updated in place in training
    running_var: Tensor  # [nhead], updated in place in training
    num_batches_tracked: Optional[Tensor]  # scalar long, incremented in training
    momentum: Optional[float]  # None: cumulative average, as nn.BatchNorm1d
    eps: float
    coverage: CoverageMode

    @classmethod
    def from_module(cls, arm) -> "ARMWeights":
        """From an AttentionRefinementModule (fastcomer's or the public CoMER code's)."""
        bn = arm.post_norm.bn
        coverage = CoverageMode.of(bool(arm.cross_coverage), bool(arm.self_coverage))
        return cls(arm.conv.weight, arm.conv.bias, arm.proj.weight, bn.weight, bn.bias, bn.running_mean,
                   bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps, coverage)


def float32_precisions(q: Tensor, precision: Optional[str]) -> Tuple[str, str]:
    """(attention matmuls, ARM conv and projection) precision of float32 products: `precision`
    for both when given, else eager PyTorch's policy on CUDA (torch.bmm: TF32 when
    torch.backends.cuda.matmul.allow_tf32; cuDNN's conv: when torch.backends.cudnn.allow_tf32),
    'ieee' on the CPU."""
    if precision is not None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")
        return precision, precision
    if not q.is_cuda or q.dtype != torch.float32:
        return "ieee", "ieee"
    tf32 = lambda allowed: "tf32" if allowed else "ieee"
    return tf32(torch.backends.cuda.matmul.allow_tf32), tf32(torch.backends.cudnn.allow_tf32)


def check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, height: int, width: int,
           prev_attn: Optional[Tensor], arm: Optional[ARMWeights], precision: str) -> int:
    """Validate shapes, dtypes and devices; returns the number of heads."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q [B*H, T, D], k and v [B*H, L, D] expected, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == key_padding_mask.device):
        raise ValueError("q, k, v and key_padding_mask must be on one device")
    if key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2:
        raise ValueError(f"key_padding_mask must be bool [B, L], got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    b, L = key_padding_mask.shape
    if height * width != L or k.shape[1] != L:
        raise ValueError(f"height*width = {height}*{width} must equal L = {L} (k has {k.shape[1]} keys)")
    if q.shape[0] % b:
        raise ValueError(f"q has {q.shape[0]} rows, not a multiple of the batch {b}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    nhead = q.shape[0] // b
    if arm is not None:
        if not isinstance(arm.coverage, CoverageMode):
            raise ValueError(f"arm.coverage must be a CoverageMode, got {arm.coverage!r}")
        cin = arm.coverage.channels(nhead)
        if arm.conv_weight.shape[0] > 32:
            raise ValueError(f"the fused ARM supports up to 32 conv channels (CoMER's dc), got {arm.conv_weight.shape[0]}")
        if arm.conv_weight.shape[1:] != (cin, KERNEL_SIZE, KERNEL_SIZE) or arm.proj_weight.shape[:2] != (nhead, arm.conv_weight.shape[0]):
            raise ValueError(f"ARM weights do not fit {nhead} heads with coverage {arm.coverage.value!r}")
        if arm.coverage.uses_cross and (prev_attn is None or prev_attn.shape != (q.shape[0], q.shape[1], L)):
            raise ValueError(f"coverage {arm.coverage.value!r} needs prev_attn [B*H, T, L] = {(q.shape[0], q.shape[1], L)}")
    return nhead
