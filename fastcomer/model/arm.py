"""The Attention Refinement Module (SPEC section 2), the plain-PyTorch reference.

Every other path of fastcomer (the decoding engine, the Triton and CUDA kernels)
is checked against this file; `refine_coverage` is the one definition of the
coverage -> refinement map that they all share.
"""
import enum
from typing import NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


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


class MaskBatchNorm2d(nn.Module):
    """BatchNorm over channels, applied only at unmasked positions (masked ones keep
    their input). Training statistics are taken over the unmasked positions only.

    The function of nn.BatchNorm1d on the unmasked positions gathered into rows, computed
    with masked sums and counts instead of the gather, so that no shape depends on the
    mask's values (torch.compile and torch.export trace it as one graph). `bn` is a plain
    nn.BatchNorm1d holding the parameters and buffers (CoMER's names and state dict)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x [N, C, h, w], mask [N, h, w] (True = padding) -> [N, C, h, w]."""
        bn = self.bn
        keep = ~mask[:, None]  # [N, 1, h, w]
        if bn.training or bn.running_mean is None:
            mean, var = self.batch_statistics(x, keep)
        else:
            mean, var = bn.running_mean, bn.running_var
        y = (x - mean[:, None, None]) * torch.rsqrt(var + bn.eps)[:, None, None]
        if bn.affine:
            y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
        return torch.where(keep, y, x)

    def batch_statistics(self, x: Tensor, keep: Tensor) -> Tuple[Tensor, Tensor]:
        """Mean and biased variance per channel over the kept positions; in training with
        running statistics, updates them as nn.BatchNorm1d does (unbiased variance, momentum,
        or the cumulative average when momentum is None)."""
        bn = self.bn
        dims = (0, 2, 3)
        count = keep.sum().to(x.dtype)
        mean = torch.where(keep, x, 0.0).sum(dims) / count
        var = torch.where(keep, x - mean[:, None, None], 0.0).square().sum(dims) / count
        if bn.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                # a tensor factor, not float(num_batches_tracked): no host sync, no graph break
                factor = bn.num_batches_tracked.to(x.dtype).reciprocal() if bn.momentum is None else bn.momentum
                bn.running_mean.mul_(1 - factor).add_(factor * mean)
                bn.running_var.mul_(1 - factor).add_(factor * var * count / (count - 1))
        return mean, var


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

    def coverage_inputs(self, prev_attn: Tensor, curr_attn: Tensor) -> Tensor:
        """Stack the attentions the ARM accumulates along the channel axis:
        [b, nhead, t, L] each -> [b, C, t, L], previous layer's first."""
        parts = []
        if self.cross_coverage:
            parts.append(prev_attn)
        if self.self_coverage:
            parts.append(curr_attn)
        return torch.cat(parts, dim=1)

    def refine_coverage(self, coverage: Tensor, mask: Tensor) -> Tensor:
        """coverage [N, C, h, w], mask [N, h, w] -> R [N, nhead, h, w] (0 where masked)."""
        y = F.relu(self.conv(coverage))
        y = y.masked_fill(mask[:, None], 0.0)
        return self.post_norm(self.proj(y), mask)

    def forward(self, prev_attn: Tensor, key_padding_mask: Tensor, height: int, curr_attn: Tensor) -> Tensor:
        """prev_attn, curr_attn [(b nhead), t, L]; key_padding_mask [b, L] -> R [(b nhead), t, L].

        The argument order lets a decoder bind (prev_attn, mask, height) with
        functools.partial and hand the attention a function of its own weights.
        """
        bn, t, L = curr_attn.shape
        b, n = bn // self.nhead, self.nhead
        width = L // height
        x = self.coverage_inputs(prev_attn.view(b, n, t, L), curr_attn.view(b, n, t, L))
        coverage = x.cumsum(dim=2) - x  # exclusive prefix sum over t, as CoMER computes it
        coverage = coverage.transpose(1, 2).reshape(b * t, -1, height, width)
        mask = key_padding_mask.view(b, 1, height, width).expand(b, t, height, width).reshape(b * t, height, width)
        r = self.refine_coverage(coverage, mask)
        return r.view(b, t, n, L).transpose(1, 2).reshape(bn, t, L)

    def fold(self) -> FoldedARM:
        """The eval-mode ARM with BatchNorm (running statistics) folded into the projection."""
        bn = self.post_norm.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return FoldedARM(
            self.conv.weight, self.conv.bias, self.proj.weight.flatten(1) * scale[:, None],
            bn.bias - bn.running_mean * scale, self.coverage_mode,
        )
