"""One decoder layer's self-attention block for the newest token of every row, fused: q/k/v
projection, append of k and v to the row's cache, attention over the prefix window (PAD
positions masked), out projection, residual and norm1, and the cross-attention's query
projection that follows.

`self_attention_step` is the entry and the one place that branches on the backend: the
Triton kernel (`triton_kernel`, one launch per layer) or plain PyTorch (`reference`); see
`fastcomer.ops.dispatch` for how the backend is chosen.
"""
from typing import Tuple

from torch import Tensor

from ..dispatch import BackendRequest, resolve

__all__ = ["self_attention_step"]


def self_attention_step(x: Tensor, layer, keys: Tensor, values: Tensor, tokens: Tensor, position: Tensor,
                        window: int, backend: BackendRequest = None) -> Tuple[Tensor, Tensor]:
    """x [rows, d]: the layer's input for the newest token; layer: a TransformerDecoderLayer;
    keys [rows, nhead, head_dim, max_len] (transposed) and values [rows, nhead, max_len, head_dim]:
    the layer's self-attention K/V of every row (any strides), where this step's k and v are
    written at `position` (0-dim long tensor: the newest token's index); tokens [rows, max_len]:
    PAD marks the positions the attention skips; window: how many positions it reads (> position).
    Returns (norm1(x + self_attn(x)) [rows, d], the cross-attention's scaled query [rows, d]).
    backend: as `fastcomer.ops.dispatch.resolve` takes it (the engine passes its plan's)."""
    args = (x, layer, keys, values, tokens, position, window)
    if resolve("self_attention_step", x, backend) == "triton":
        from .triton_kernel import self_attention_step as triton_step

        return triton_step(*args)
    from .reference import self_attention_step as torch_step

    return torch_step(*args)
