"""The fused cross-attention step over flat rows: one call per decoder layer per decoding
step, for every beam: cross-attention with the ARM for the newest token of each row.

`cross_attention_step` is the entry and the one place that branches on the backend. It
computes the function of `reference.cross_attention_step` for rows that name their image
through `image_index`, on the CUDA extension (`cuda_kernel`), the Triton kernels
(`triton_kernel`) or plain PyTorch (`reference`); see `fastcomer.ops.dispatch` for how the
backend is chosen (a forced one that cannot run the inputs raises).
"""
from typing import Optional, Tuple

from torch import Tensor

from ...model.arm import FoldedARM
from ..dispatch import BackendRequest, resolve
from .inputs import check_image_index, check_inputs, check_rows_per_image

__all__ = ["cross_attention_step"]


def cross_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    image_index: Tensor,
    height: int,
    arm: Optional[FoldedARM],
    coverage: Optional[Tensor],
    prev_attn: Optional[Tensor],
    backend: BackendRequest = None,
    rows_per_image: Optional[int] = None,
    index_checked: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One step of cross-attention with the ARM for all rows of one decoder layer.

    q [R, nhead, head_dim] (already scaled); k, v [I, nhead, L, head_dim] (each image once;
    any strides with a unit last stride); key_padding_mask [I, L] bool (True = padding);
    image_index [R] int32/int64: row r reads image image_index[r], or is inactive when it is
    negative (its output and returned attention are 0, its coverage row is not touched);
    height: of the h x w = L feature map (row-major); arm: the folded ARM (needed when a
    coverage is given).
    coverage [R, C, L] (cross block first; each row contiguous, any row stride), or None for
    layer 0 / a model without ARM: this layer's sums over the previous steps, which it refines
    with; after the conv has read them, this step is added in place: cross block += prev_attn,
    self block += A (the unrefined attention).
    prev_attn [R, nhead, L]: what the previous layer returned at this step (needed when
    refining with cross coverage; ignored otherwise).
    backend: 'auto' | 'cuda' | 'triton' | 'torch', or a mapping naming this op (default:
    $FASTCOMER_BACKEND, else auto; `fastcomer.ops.dispatch`).
    rows_per_image: G when the rows come in groups of G per image, in image order (row r
    reads image r // G, or is skipped; checked on the CPU): each image's K/V is then read once
    for its G rows (the torch path instead of gathering a copy per row, the kernels by one
    program per slot, head and split of L instead of one per row and head).
    index_checked: True when the caller built image_index itself and vouches for its values
    (the decoding engine, whose rows read their own slot's image or are skipped): the
    per-call value checks of image_index are left out (on a GPU, two launches per call).
    Returns (A'V [R, nhead, head_dim] in q's dtype, returned [R, nhead, L]: the attention this
    layer returns, A' (A without refinement), float32 (float64 for float64 inputs), which is
    the next layer's prev_attn).
    """
    shape = check_inputs(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn)
    if not index_checked:
        check_image_index(image_index, shape.images)
    check_rows_per_image(rows_per_image, shape, None if index_checked else image_index)
    args = (q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn)
    cuda_unsupported = None
    if q.is_cuda:
        from .cuda_kernel import unsupported_inputs

        cuda_unsupported = unsupported_inputs(shape, q, coverage, prev_attn)
    name = resolve("cross_attention_step", q, backend, cuda_unsupported)
    if name == "torch":
        from .reference import cross_attention_step as torch_step

        return torch_step(*args, rows_per_image=rows_per_image)
    if name == "cuda":
        from .cuda_kernel import cross_attention_step as kernel_step
    else:
        from .triton_kernel import cross_attention_step as kernel_step
    return kernel_step(*args, shape=shape, rows_per_image=rows_per_image)
