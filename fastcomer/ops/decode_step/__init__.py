"""The fused decode step over flat rows: one call per decoder layer per step, for every beam.

`fused_cross_attention_step` is what the decoding engine calls, and the one place that
branches on the backend. It computes the function of `reference.cross_attention_step` for
rows that name their image through `image_index`, and runs it on the CUDA extension
(`cuda_kernel`), the Triton kernel (`triton_kernel`) or plain PyTorch (`reference`); see
`fastcomer.backends` for how the backend is chosen.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import backends
from ...model.arm import FoldedARM
from .interface import check_inputs, check_rows_per_image, refresh_prepared_weights
from .reference import rows_step

__all__ = ["fused_cross_attention_step", "coverage_dtype", "refresh_prepared_weights"]


def coverage_dtype(backend: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the coverage sums a backend (resolved) keeps for a model of `dtype`: the
    kernels keep them in float32 whatever the model's dtype."""
    return dtype if backend == "torch" else torch.float32


def check_image_index(image_index: Tensor, images: int) -> None:
    """Every row's image exists (negative = skipped row): the kernels read image_index[r]'s K/V
    unchecked. On the CPU it raises ValueError at once; elsewhere (CUDA) the check runs on the
    device, without a host sync: a failure is a device-side assert, reported by the next
    sync, after which the CUDA context is lost."""
    if image_index.numel() == 0:
        return
    largest = image_index.max()
    if image_index.device.type != "cpu":
        torch._assert_async(largest < images, "fused_cross_attention_step: image_index past the number of images")
    elif not torch.compiler.is_compiling() and int(largest) >= images:  # traced, the host check would break the graph
        raise ValueError(f"fused_cross_attention_step: image_index must be < {images} (the number of images) "
                         f"or negative (a skipped row), got {int(largest)}")


def fused_cross_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    image_index: Tensor,
    height: int,
    arm: Optional[FoldedARM],
    coverage: Optional[Tensor],
    prev_attn: Optional[Tensor],
    backend: Optional[str] = None,
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
    backend: 'auto' | 'cuda' | 'triton' | 'torch' (default: $FASTCOMER_BACKEND, else auto).
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
    name = backends.resolve(q, backend)
    if name == "cuda":
        from .cuda_kernel import cuda_step, unsupported_reason

        why = unsupported_reason(shape, q, coverage, prev_attn)
        if why is None:
            return cuda_step(*args, shape=shape, rows_per_image=rows_per_image)
        if backends.requested_backend(backend) == "cuda":
            raise ValueError(f"backend 'cuda' cannot run this step: {why}")
        # auto: the Triton kernel computes the same function for shapes the CUDA build lacks
        name = "triton" if backends.triton_status()[0] else "torch"
    if name == "triton":
        from .triton_kernel import triton_step

        return triton_step(*args, shape=shape, rows_per_image=rows_per_image)
    return rows_step(*args, rows_per_image=rows_per_image)
