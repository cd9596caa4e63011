"""The rest of one decoder layer for the newest token of every row, after the cross-attention
step, fused: the cross-attention's out projection, residual and norm2, then the feed-forward
block (linear1, ReLU, linear2, residual, norm3).

`feed_forward_step` is what `DecodingState.step` calls for the kernel backends and the one
place that branches on the backend: the Triton kernel (`triton_kernel`, one launch per layer)
or the plain PyTorch code (`reference`).
"""
from torch import Tensor

from ... import backends
from .reference import reference_step

__all__ = ["feed_forward_step"]


def feed_forward_step(x: Tensor, attended: Tensor, layer, backend: str) -> Tensor:
    """x [rows, d]: the layer's stream after norm1; attended [rows, d]: the cross-attention's
    A'V, heads concatenated; layer: a TransformerDecoderLayer. Returns
    feed_forward(norm2(x + out_proj(attended))) [rows, d], the layer's output.
    backend: the resolved backend ('torch', 'triton' or 'cuda'); the kernel backends run the
    Triton kernel ('cuda' takes the torch code where Triton cannot run)."""
    if backend not in ("torch", "triton", "cuda"):
        raise ValueError(f"backend must be a resolved backend ('torch', 'triton' or 'cuda'), got {backend!r}")
    if backend == "triton" or (backend == "cuda" and backends.triton_status()[0]):
        from .triton_kernel import triton_feed_forward_step

        return triton_feed_forward_step(x, attended, layer)
    return reference_step(x, attended, layer)
