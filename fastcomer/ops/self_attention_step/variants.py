"""The self-attention step's Triton launch at the shapes the static kernel report covers: the
launcher's own launch (`triton_kernel.self_attention_step` on meta tensors, recorded by
`ops.triton_launch`) and what it costs (FLOPs, unique global bytes).

Shapes: CoMER's decoder layer (d_model 256, nhead 8) at the cross-attention step's images and
dtypes (20 rows per image: 2 directions x 10 beams), the K/V cache of max_len 200 read over the
full window (the last step of a search, the widest launch)."""
from typing import List

import torch

from ...model.comer import CoMERConfig
from ...model.decoder import TransformerDecoderLayer
from ..cross_attention_step.variants import ELEMENT_BYTES, ROWS_PER_IMAGE, TORCH_DTYPES, per_decoding_shape
from ..registry import KernelVariant
from ..triton_launch import recorded
from .triton_kernel import self_attention_step

__all__ = ["kernel_variants", "MAX_LEN"]

MAX_LEN = 200  # the searches' default max_len


def meta_layer(dtype: torch.dtype) -> TransformerDecoderLayer:
    """A published decoder layer on the meta device (shapes and dtypes only, no memory)."""
    config = CoMERConfig()
    with torch.device("meta"):
        layer = TransformerDecoderLayer(config.d_model, config.nhead, config.dim_feedforward, 0.0)
    return layer.to(dtype)


def _variant(images: int, dtype: str) -> KernelVariant:
    rows, window = images * ROWS_PER_IMAGE, MAX_LEN
    layer = meta_layer(TORCH_DTYPES[dtype])
    d, nhead = layer.norm1.normalized_shape[0], layer.self_attn.num_heads
    head_dim = d // nhead
    meta = lambda *size, dtype=TORCH_DTYPES[dtype]: torch.empty(*size, device="meta", dtype=dtype)
    with recorded() as launches:
        self_attention_step(meta(rows, d), layer, meta(rows, nhead, head_dim, MAX_LEN),
                            meta(rows, nhead, MAX_LEN, head_dim), meta(rows, MAX_LEN, dtype=torch.long),
                            meta((), dtype=torch.long), window)
    (launch,) = launches
    # q, k, v, out and query projections (GEMVs), scores and weighted values over the window
    flops = rows * (2 * 5 * d * d + 2 * 2 * nhead * head_dim * window)
    nbytes = ELEMENT_BYTES[dtype] * (5 * d * d + rows * (2 * nhead * head_dim * window + 4 * d)) + rows * window * 8
    return KernelVariant("self_attention_step", f"self_attention_step[images={images},window={window},{dtype}]",
                         launch, 1, float(flops), float(nbytes), dtype)


def kernel_variants(shapes: str, arch: int) -> List[KernelVariant]:
    """The self-attention step's launch of one layer per image count and dtype of `shapes`
    ("published" or "small"); arch does not change it."""
    del arch
    return per_decoding_shape(shapes, _variant)
