"""One decoding step of cross-attention with the ARM, for every live row, in plain PyTorch.

This is the reference of the fused kernels (and the torch backend). State per refining layer j > 0
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

from ...model.arm import CONV_PADDING, FoldedARM
from .inputs import returned_dtype


def refine_folded(arm: FoldedARM, coverage: Tensor, mask: Tensor, height: int) -> Tensor:
    """coverage [N, C, L], mask [N, L] (True = padding) -> R [N, nhead, L], 0 where masked."""
    n, c, L = coverage.shape
    y = F.conv2d(coverage.view(n, c, height, L // height), arm.conv_weight, arm.conv_bias, padding=CONV_PADDING)
    # The ARM zeroes Y at masked positions before its 1x1 projection; the projection is
    # pointwise, so zeroing R there instead gives the same R. In place: no tensor of this size
    # allocated twice (the decoding engine's torch path runs this at every step).
    r = torch.matmul(arm.proj_weight, y.relu_().flatten(2))
    r += arm.shift[:, None]
    return r.masked_fill_(mask[:, None], 0.0)


def grouped_cross_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    height: int,
    arm: Optional[FoldedARM],
    coverage: Optional[Tensor],
    prev_attn: Optional[Tensor],
    updated: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One query per row; rows grouped by image, G rows per image.

    q [I, G, nhead, hd] (scaled), k, v [I, nhead, L, hd] (each image's memory once, shared
    by its rows, never copied per row), key_padding_mask [I, L] (True = padding).
    For a refining layer: arm, coverage [I*G, C, L] (the sums over the previous steps),
    and with cross coverage prev_attn [I*G, nhead, L] (what the previous layer returned
    at this step); for layer 0, or a model without ARM, coverage is None.
    Returns A'V [I, G, nhead, hd] and the attention this layer returns, [I*G, nhead, L]
    (its prev_attn for the next layer); adds this step's attentions to coverage in place,
    to the rows where `updated` [I*G] (bool) is True, or to every row when it is None.
    """
    i, g, nhead, _ = q.shape
    L = k.shape[2]
    scores = torch.matmul(q.transpose(1, 2), k.transpose(2, 3))  # [I, nhead, G, L]
    # masked in place: the refined scores below, scores - R, stay -inf where these are
    attn = torch.softmax(scores.masked_fill_(key_padding_mask.view(i, 1, 1, L), float("-inf")), dim=-1)
    if coverage is None:
        refined = attn
    else:
        r = refine_folded(arm, coverage, key_padding_mask.repeat_interleave(g, dim=0), height)  # [I*G, nhead, L]
        refined = torch.softmax(scores - r.view(i, g, nhead, L).transpose(1, 2), dim=-1)
        keep = None if updated is None else updated.view(i * g, 1, 1).to(coverage.dtype)
        if arm.coverage.uses_cross:
            cross = coverage[:, :nhead]
            cross.add_(prev_attn) if keep is None else cross.addcmul_(prev_attn, keep)
        if arm.coverage.uses_self:  # added through a view in attn's layout: no copy of this step's attention
            own = coverage[:, -nhead:].view(i, g, nhead, L).transpose(1, 2)
            own.add_(attn) if keep is None else own.addcmul_(attn, keep.view(i, 1, g, 1))
    returned = refined.transpose(1, 2).reshape(i * g, nhead, L)
    return torch.matmul(refined, v).transpose(1, 2), returned


def cross_attention_step(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn,
                         rows_per_image: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The op over flat rows, the torch backend (arguments as the entry's,
    `fastcomer.ops.cross_attention_step.cross_attention_step`): `grouped_cross_attention_step`
    for rows that name their image; rows with a negative image index give 0 and keep their
    coverage. With rows_per_image = G (row r reads image r // G) each image's K/V is read in
    place by its G rows; otherwise each active row's K/V is gathered, a copy per row."""
    rows, nhead, head_dim = q.shape
    active = image_index >= 0
    if rows_per_image is not None:
        images = k.shape[0]
        out, returned = grouped_cross_attention_step(q.view(images, rows_per_image, nhead, head_dim), k, v, key_padding_mask,
                                             height, arm, coverage, prev_attn, updated=active)
        inactive = ~active.view(rows, 1, 1)
        # both are fresh tensors (a reshape of a transpose copies; so may .to): filled in place
        out = out.reshape(rows, nhead, head_dim).masked_fill_(inactive, 0.0)
        returned = returned.to(returned_dtype(q)).masked_fill_(inactive, 0.0)
        return out, returned
    index = active.nonzero().squeeze(1)
    image = image_index[index].long()
    sub_coverage = None if coverage is None else coverage[index]
    sub_prev = None if prev_attn is None else prev_attn[index]
    result, sub_returned = grouped_cross_attention_step(q[index][:, None], k[image], v[image], key_padding_mask[image],
                                                height, arm, sub_coverage, sub_prev)
    out = torch.zeros_like(q)
    out[index] = result[:, 0]
    returned = q.new_zeros(rows, nhead, k.shape[2], dtype=returned_dtype(q))
    returned[index] = sub_returned.to(returned.dtype)
    if coverage is not None:
        coverage[index] = sub_coverage
    return out, returned
