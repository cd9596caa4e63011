"""The feed-forward step's Triton launch at the shapes the static kernel report covers: the
launcher's own launch (`triton_kernel.feed_forward_step` on meta tensors, recorded by
`ops.triton_launch`) and what it costs (FLOPs, unique global bytes).

Shapes: CoMER's decoder layer (d_model 256, dim_feedforward 1024) at the cross-attention step's
images and dtypes (20 rows per image: 2 directions x 10 beams)."""
from typing import List

import torch

from ..cross_attention_step.variants import ELEMENT_BYTES, ROWS_PER_IMAGE, TORCH_DTYPES, per_decoding_shape
from ..registry import KernelVariant
from ..self_attention_step.variants import meta_layer
from ..triton_launch import recorded
from .triton_kernel import feed_forward_step

__all__ = ["kernel_variants"]


def _variant(images: int, dtype: str) -> KernelVariant:
    rows = images * ROWS_PER_IMAGE
    layer = meta_layer(TORCH_DTYPES[dtype])
    d, hidden = layer.linear1.in_features, layer.linear1.out_features
    meta = lambda *size: torch.empty(*size, device="meta", dtype=TORCH_DTYPES[dtype])
    with recorded() as launches:
        feed_forward_step(meta(rows, d), meta(rows, d), layer)
    (launch,) = launches
    flops = rows * (2 * d * d + 2 * 2 * d * hidden)  # out projection, linear1, linear2 (GEMVs)
    nbytes = ELEMENT_BYTES[dtype] * (d * d + 2 * d * hidden + 3 * rows * d)
    return KernelVariant("feed_forward_step", f"feed_forward_step[images={images},{dtype}]", launch, 1, float(flops),
                         float(nbytes), dtype)


def kernel_variants(shapes: str, arch: int) -> List[KernelVariant]:
    """The feed-forward step's launch of one layer per image count and dtype of `shapes`
    ("published" or "small"); arch does not change it."""
    del arch
    return per_decoding_shape(shapes, _variant)
