"""The Attention Refinement Module, the plain-PyTorch reference (its math: docs/function.md,
'The Attention Refinement Module').

Every other path of fastcomer (the decoding engine, the Triton and CUDA kernels)
is checked against this file; `arm_refinement` is the one definition of the
coverage -> refinement map (`masked_batch_norm` of its BatchNorm) that they all share.
"""
import enum
import os
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .batch_norm import running_affine


# The ARM's coverage convolution is KERNEL_SIZE x KERNEL_SIZE, "same" padded (CoMER's 5x5):
# every kernel reads CONV_TAPS neighbours, CONV_PADDING cells around each position.
KERNEL_SIZE = 5
CONV_PADDING = KERNEL_SIZE // 2
CONV_TAPS = KERNEL_SIZE * KERNEL_SIZE


class CoverageMode(str, enum.Enum):
    """Which attentions the ARM accumulates: the previous layer's (cross), this layer's
    unrefined one (self), or both (cross channels first)."""

    CROSS = "cross"
    SELF = "self"
    BOTH = "both"

    @classmethod
    def of(cls, cross_coverage: bool, self_coverage: bool) -> "CoverageMode":
        if cross_coverage and self_coverage:
            return cls.BOTH
        if cross_coverage or self_coverage:
            return cls.CROSS if cross_coverage else cls.SELF
        raise ValueError("the ARM needs cross_coverage or self_coverage (or both)")

    @property
    def uses_cross(self) -> bool:
        return self is not CoverageMode.SELF

    @property
    def uses_self(self) -> bool:
        return self is not CoverageMode.CROSS

    def channels(self, nhead: int) -> int:
        """The coverage image's channels: nhead per accumulated attention."""
        return nhead * (int(self.uses_cross) + int(self.uses_self))


class FoldedARM(NamedTuple):
    """The eval-mode ARM as plain tensors, BatchNorm folded into the 1x1 projection:
    R = proj_weight @ relu(conv(C) + conv_bias) + shift at unmasked positions, 0 elsewhere."""

    conv_weight: Tensor  # [dc, C, KERNEL_SIZE, KERNEL_SIZE], C = coverage.channels(nhead)
    conv_bias: Tensor  # [dc]
    proj_weight: Tensor  # [nhead, dc]
    shift: Tensor  # [nhead]
    coverage: CoverageMode


def masked_batch_norm(x: Tensor, mask: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
                      training: bool) -> Tensor:
    """BatchNorm over the channels of x [N, C, h, w], applied only where mask [N, h, w] is False
    (True = padding keeps its input): nn.BatchNorm1d's function on the unmasked positions
    gathered into rows, computed with masked sums and counts instead of the gather, so that no
    shape depends on the mask's values (torch.compile and torch.export trace it as one graph).
    In training (or without running statistics) the statistics are the unmasked positions' and
    the running ones, when given, are updated in place as nn.BatchNorm1d does (unbiased
    variance, momentum, or the cumulative average when momentum is None)."""
    keep = ~mask[:, None]  # [N, 1, h, w]
    if training or running_mean is None:
        dims = (0, 2, 3)
        count = keep.sum().to(x.dtype)
        mean = torch.where(keep, x, 0.0).sum(dims) / count
        var = torch.where(keep, x - mean[:, None, None], 0.0).square().sum(dims) / count
        if training and running_mean is not None:
            with torch.no_grad():
                num_batches_tracked.add_(1)
                # a tensor factor, not float(num_batches_tracked): no host sync, no graph break
                factor = num_batches_tracked.to(x.dtype).reciprocal() if momentum is None else momentum
                running_mean.mul_(1 - factor).add_(factor * mean)
                running_var.mul_(1 - factor).add_(factor * var * count / (count - 1))
    else:
        mean, var = running_mean, running_var
    y = (x - mean[:, None, None]) * torch.rsqrt(var + eps)[:, None, None]
    if weight is not None:
        y = y * weight[:, None, None] + bias[:, None, None]
    return torch.where(keep, y, x)


class MaskBatchNorm2d(nn.Module):
    """`masked_batch_norm` with the parameters and buffers of `bn`, a plain nn.BatchNorm1d
    (CoMER's names and state dict)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [N, C, h, w], mask [N, h, w] (True = padding) -> [N, C, h, w]."""
        bn = self.bn
        return masked_batch_norm(x, mask, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                                 bn.momentum, bn.eps, bn.training)


def arm_refinement(prev_attn: Tensor, curr_attn: Tensor, key_padding_mask: Tensor, height: int, nhead: int,
                   coverage: CoverageMode, conv_weight: Tensor, conv_bias: Tensor, proj_weight: Tensor,
                   normalize: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The ARM's R (docs/function.md, 'The Attention Refinement Module') from plain tensors:
    prev_attn, curr_attn [(b nhead), t, L]; key_padding_mask [b, L]; conv_weight [dc, C, K, K],
    conv_bias [dc], proj_weight [nhead, dc, 1, 1]; normalize(z [N, nhead, h, w], mask [N, h, w])
    the masked BatchNorm.
    Returns R [(b nhead), t, L], 0 at masked positions."""
    bn, t, L = curr_attn.shape
    b, n = bn // nhead, nhead
    width = L // height
    parts = ([prev_attn.view(b, n, t, L)] if coverage.uses_cross else []) + \
            ([curr_attn.view(b, n, t, L)] if coverage.uses_self else [])
    x = torch.cat(parts, dim=1)  # [b, C, t, L], the previous layer's attention first
    prefix = x.cumsum(dim=2) - x  # exclusive prefix sum over t, as CoMER computes it
    prefix = prefix.transpose(1, 2).reshape(b * t, -1, height, width)
    mask = key_padding_mask.view(b, 1, height, width).expand(b, t, height, width).reshape(b * t, height, width)
    y = F.relu(F.conv2d(prefix, conv_weight, conv_bias, padding=CONV_PADDING))
    y = y.masked_fill(mask[:, None], 0.0)
    r = normalize(F.conv2d(y, proj_weight), mask)
    return r.view(b, t, n, L).transpose(1, 2).reshape(bn, t, L)


class AttentionRefinementModule(nn.Module):
    def __init__(self, nhead: int, dc: int, cross_coverage: bool, self_coverage: bool):
        super().__init__()
        self.nhead = nhead
        # CoMER's attribute names, which patch() and ARMWeights.from_module read on its modules too
        self.coverage_mode = CoverageMode.of(cross_coverage, self_coverage)
        self.cross_coverage = cross_coverage
        self.self_coverage = self_coverage
        self.conv = nn.Conv2d(self.coverage_mode.channels(nhead), dc, kernel_size=KERNEL_SIZE, padding=CONV_PADDING)
        self.proj = nn.Conv2d(dc, nhead, kernel_size=1, bias=False)
        self.post_norm = MaskBatchNorm2d(nhead)

    def forward(self, prev_attn: Tensor, key_padding_mask: Tensor, height: int, curr_attn: Tensor) -> Tensor:
        """prev_attn, curr_attn [(b nhead), t, L]; key_padding_mask [b, L] -> R [(b nhead), t, L].

        The argument order lets a decoder bind (prev_attn, mask, height) with
        functools.partial and hand the attention a function of its own weights.
        """
        return arm_refinement(prev_attn, curr_attn, key_padding_mask, height, self.nhead, self.coverage_mode,
                              self.conv.weight, self.conv.bias, self.proj.weight, self.post_norm)

    def fold(self) -> FoldedARM:
        """The eval-mode ARM with BatchNorm (running statistics) folded into the projection
        (the conv's tensors are the module's own; see `folded_copy`)."""
        scale, shift = running_affine(self.post_norm.bn)
        return FoldedARM(self.conv.weight, self.conv.bias, self.proj.weight.flatten(1) * scale[:, None], shift,
                         self.coverage_mode)


def folded_copy(arm: Optional[AttentionRefinementModule]) -> Optional[FoldedARM]:
    """arm.fold() in tensors of its own (none of them the module's), from the weights as they
    are now (None without an ARM): folding costs microseconds, so the engine folds afresh at the
    start of every search rather than trusting a cache to notice every change of the weights."""
    if arm is None:
        return None
    with torch.no_grad():
        folded = arm.fold()
    layout = conv_memory_format(folded.conv_weight.device)
    return folded._replace(conv_weight=folded.conv_weight.clone(memory_format=layout), conv_bias=folded.conv_bias.clone())


def conv_memory_format(device: torch.device) -> torch.memory_format:
    """The layout of the folded ARM's convolution weight on `device`, which oneDNN's convolution
    follows (its input converted, its output in that layout): channels-last on CPUs with AVX-512,
    where oneDNN ran the ARM's 5x5 convolution 1.15-1.8x faster so at the engine's shapes (8x32 maps,
    10-400 rows), with the same results; contiguous elsewhere, as on AVX2, where channels-last ran at
    0.75-1.06x (benchmarks/results/cpu-measurements-2026-12-03.md), and on CUDA (not measured). A
    layout's results may differ from the other's in the last bits: the choice depends only on the
    machine (and ONEDNN_MAX_CPU_ISA, which caps oneDNN's instructions), never on timings."""
    if device.type != "cpu":
        return torch.contiguous_format
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if capped and not capped.startswith(("AVX512", "AVX10", "AMX", "ALL")):
        return torch.contiguous_format
    avx512 = getattr(torch.cpu, "_is_avx512_supported", None)  # torch's CPU feature query (2.1 on)
    return torch.channels_last if avx512 is not None and avx512() else torch.contiguous_format
