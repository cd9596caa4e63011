"""One decoding step of cross-attention with the ARM, for every live row, in plain PyTorch.

This is the reference of the fused decode kernels. State per layer j (coverage mode
cross+self): coverage[j] [rows, 2*nhead, L] holds the running sums over the steps so
far of the attention layer j-1 returned (channels :nhead) and of layer j's unrefined
attention (channels nhead:). A step reads coverage[j] to refine, then adds this step's
unrefined attention to coverage[j]'s self part and the refined attention to
coverage[j+1]'s cross part, so step t costs O(L) per row, not O(t*L).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.arm import FoldedARM


def refine_folded(arm: FoldedARM, coverage: Tensor, mask: Tensor, height: int) -> Tensor:
    """coverage [N, C, L], mask [N, L] (True = padding) -> R [N, nhead, L], 0 where masked."""
    n, c, L = coverage.shape
    y = F.relu(F.conv2d(coverage.view(n, c, height, L // height), arm.conv_weight, arm.conv_bias, padding=2))
    y = y.flatten(2).masked_fill(mask[:, None], 0.0)
    r = torch.matmul(arm.proj_weight, y) + arm.shift[:, None]
    return r.masked_fill(mask[:, None], 0.0)


def cross_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    height: int,
    arm: Optional[FoldedARM],
    coverage: Optional[Tensor],
    next_coverage: Optional[Tensor],
) -> Tensor:
    """One query per row; rows grouped by image, G rows per image.

    q [I, G, nhead, hd] (scaled), k, v [I, nhead, L, hd] (each image's memory once, shared
    by its rows, never copied per row), key_padding_mask [I, L]; coverage [I*G, C, L] for
    a refining layer (None for layer 0), next_coverage likewise for the next layer (None
    for the last). Returns A'V [I, G, nhead, hd] and updates both coverages in place.
    """
    i, g, nhead, _ = q.shape
    L = k.shape[2]
    scores = torch.matmul(q.transpose(1, 2), k.transpose(2, 3))  # [I, nhead, G, L]
    mask = key_padding_mask[:, None, None, :]
    attn = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    rows_mask = key_padding_mask.repeat_interleave(g, dim=0)
    if coverage is not None:
        r = refine_folded(arm, coverage, rows_mask, height)  # [I*G, nhead, L]
        r = r.view(i, g, nhead, L).transpose(1, 2)
        refined = torch.softmax((scores - r).masked_fill(mask, float("-inf")), dim=-1)
        if arm.self_coverage:
            coverage[:, -nhead:] += attn.transpose(1, 2).reshape(i * g, nhead, L)
    else:
        refined = attn
    if next_coverage is not None and arm.cross_coverage:
        next_coverage[:, :nhead] += refined.transpose(1, 2).reshape(i * g, nhead, L)
    return torch.matmul(refined, v).transpose(1, 2)
