"""The beam scorer's Triton launch at the shapes the static kernel report covers: the launcher's
own launch (`triton_kernel.beam_scorer_step` on meta tensors, recorded by `ops.triton_launch`)
and what it costs (FLOPs, unique global bytes).

Shapes: one search per direction of each image (2 per image), 10 beams, CoMER's vocabulary and
max_len 200, logits in the cross-attention step's dtypes (float32 beam scores)."""
from typing import List

import torch

from ...vocab import VOCAB_SIZE
from ..cross_attention_step.variants import BEAMS, ELEMENT_BYTES, ROWS_PER_IMAGE, TORCH_DTYPES, per_decoding_shape
from ..registry import KernelVariant
from ..self_attention_step.variants import MAX_LEN
from ..triton_launch import recorded
from .finished_lists import FinishedLists
from .triton_kernel import beam_scorer_step

__all__ = ["kernel_variants"]


def _variant(images: int, dtype: str) -> KernelVariant:
    items = images * ROWS_PER_IMAGE // BEAMS
    rows, vocab = items * BEAMS, VOCAB_SIZE
    meta = lambda *size, dtype=torch.float32: torch.empty(*size, device="meta", dtype=dtype)
    finished = FinishedLists(items, BEAMS, MAX_LEN, 1.0, False, torch.device("meta"))
    with recorded() as launches:
        beam_scorer_step(meta(rows, vocab, dtype=TORCH_DTYPES[dtype]), 1.0, meta(items, BEAMS),
                         meta(items, dtype=torch.bool), meta(items, dtype=torch.long), finished,
                         meta(rows, MAX_LEN, dtype=torch.long), meta((), dtype=torch.long))
    (launch,) = launches
    flops = rows * vocab * 4  # scale, exp, sum and shift per candidate (the top-k is comparisons)
    # logits read; at most beam_size finished entries copied per item (tokens), the lists read
    nbytes = ELEMENT_BYTES[dtype] * rows * vocab + items * BEAMS * MAX_LEN * 8 * 2 + items * (BEAMS + 1) * 8 * 3
    return KernelVariant("beam_scorer_step", f"beam_scorer_step[images={images},{dtype}]", launch, 1, float(flops),
                         float(nbytes), dtype)


def kernel_variants(shapes: str, arch: int) -> List[KernelVariant]:
    """The beam scorer's launch of one beam step per image count and logits dtype of `shapes`
    ("published" or "small"); arch does not change it."""
    del arch
    return per_decoding_shape(shapes, _variant)
