"""One decoding step of cross-attention with the ARM, for every live row, in plain PyTorch.

This is the reference of the fused decode kernels. State per refining layer j > 0
(coverage mode cross+self): coverage[j] [rows, 2*nhead, L] holds the running sums over
the steps before this one of the attention layer j-1 returned (channels :nhead) and of
layer j's unrefined attention (channels nhead:). A step refines with coverage[j], then
adds this step's two attentions to it, so step t costs O(L) per row, not O(t*L). Each
layer updates only its own sums: were layer j-1 to add to coverage[j], layer j would
see the current step in a sum that must hold only the earlier ones.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.arm import FoldedARM


def refine_folded(arm: FoldedARM, coverage: Tensor, mask: Tensor, height: int) -> Tensor:
    """coverage [N, C, L], mask [N, L] (True = padding) -> R [N, nhead, L], 0 where masked."""
    n, c, L = coverage.shape
    y = F.relu(F.conv2d(coverage.view(n, c, height, L // height), arm.conv_weight, arm.conv_bias, padding=2))
    # The ARM zeroes Y at masked positions before its 1x1 projection; the projection is
    # pointwise, so zeroing R there instead gives the same R.
    r = torch.matmul(arm.proj_weight, y.flatten(2)) + arm.shift[:, None]
    return r.masked_fill(mask[:, None], 0.0)


def cross_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    height: int,
    arm: Optional[FoldedARM],
    coverage: Optional[Tensor],
    prev_attn: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """One query per row; rows grouped by image, G rows per image.

    q [I, G, nhead, hd] (scaled), k, v [I, nhead, L, hd] (each image's memory once, shared
    by its rows, never copied per row), key_padding_mask [I, L] (True = padding).
    For a refining layer: arm, coverage [I*G, C, L] (the sums over the previous steps),
    and with cross coverage prev_attn [I*G, nhead, L] (what the previous layer returned
    at this step); for layer 0, or a model without ARM, coverage is None.
    Returns A'V [I, G, nhead, hd] and the attention this layer returns, [I*G, nhead, L]
    (its prev_attn for the next layer); adds this step's attentions to coverage in place.
    """
    i, g, nhead, _ = q.shape
    L = k.shape[2]
    scores = torch.matmul(q.transpose(1, 2), k.transpose(2, 3))  # [I, nhead, G, L]
    mask = key_padding_mask[:, None, None, :]
    attn = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    if coverage is None:
        refined = attn
    else:
        r = refine_folded(arm, coverage, key_padding_mask.repeat_interleave(g, dim=0), height)  # [I*G, nhead, L]
        refined = torch.softmax((scores - r.view(i, g, nhead, L).transpose(1, 2)).masked_fill(mask, float("-inf")), dim=-1)
        if arm.cross_coverage:
            coverage[:, :nhead] += prev_attn
        if arm.self_coverage:
            coverage[:, -nhead:] += attn.transpose(1, 2).reshape(i * g, nhead, L)
    returned = refined.transpose(1, 2).reshape(i * g, nhead, L)
    return torch.matmul(refined, v).transpose(1, 2), returned
