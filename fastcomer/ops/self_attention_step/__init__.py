"""One decoder layer's self-attention block for the newest token of every row, fused: q/k/v
projection, append of k and v to the row's cache, attention over the prefix window (PAD
positions masked), out projection, residual and norm1, and the cross-attention's query
projection that follows.

`self_attention_step` is what `DecodingState.step` calls for the kernel backends and the one
place that branches on the backend: the Triton kernel (`triton_kernel`, one launch per layer)
or the plain PyTorch code (`reference`).
"""
from typing import Tuple

from torch import Tensor

from ... import backends
from .reference import reference_step

__all__ = ["self_attention_step"]


def self_attention_step(x: Tensor, layer, keys: Tensor, values: Tensor, tokens: Tensor, position: Tensor,
                        window: int, backend: str) -> Tuple[Tensor, Tensor]:
    """x [rows, d]: the layer's input for the newest token; layer: a TransformerDecoderLayer;
    keys [rows, nhead, head_dim, max_len] (transposed) and values [rows, nhead, max_len, head_dim]:
    the layer's self-attention K/V of every row (any strides), where this step's k and v are
    written at `position`
    (0-dim long tensor: the newest token's index); tokens [rows, max_len]: PAD marks the
    positions the attention skips; window: how many positions it reads (> position).
    Returns (norm1(x + self_attn(x)) [rows, d], the cross-attention's scaled query [rows, d]).
    backend: the resolved backend ('torch', 'triton' or 'cuda'); the kernel backends run the
    Triton kernel ('cuda' takes the torch code where Triton cannot run)."""
    if backend not in ("torch", "triton", "cuda"):
        raise ValueError(f"backend must be a resolved backend ('torch', 'triton' or 'cuda'), got {backend!r}")
    args = (x, layer, keys, values, tokens, position, window)
    if backend == "triton" or (backend == "cuda" and backends.triton_status()[0]):
        from .triton_kernel import triton_self_attention_step

        return triton_self_attention_step(*args)
    return reference_step(*args)
