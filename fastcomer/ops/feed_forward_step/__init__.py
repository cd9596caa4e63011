"""The rest of one decoder layer for the newest token of every row, after the cross-attention
step, fused: the cross-attention's out projection, residual and norm2, then the feed-forward
block (linear1, ReLU, linear2, residual, norm3).

`feed_forward_step` is the entry and the one place that branches on the backend: the Triton
kernel (`triton_kernel`, one launch per layer) or plain PyTorch (`reference`); see
`fastcomer.ops.dispatch` for how the backend is chosen.
"""
from torch import Tensor

from ..dispatch import BackendRequest, resolve

__all__ = ["feed_forward_step"]


def feed_forward_step(x: Tensor, attended: Tensor, layer, backend: BackendRequest = None) -> Tensor:
    """x [rows, d]: the layer's stream after norm1; attended [rows, d]: the cross-attention's
    A'V, heads concatenated; layer: a TransformerDecoderLayer. Returns
    feed_forward(norm2(x + out_proj(attended))) [rows, d], the layer's output.
    backend: as `fastcomer.ops.dispatch.resolve` takes it (the engine passes its plan's)."""
    if resolve("feed_forward_step", x, backend) == "triton":
        from .triton_kernel import feed_forward_step as triton_step

        return triton_step(x, attended, layer)
    from .reference import feed_forward_step as torch_step

    return torch_step(x, attended, layer)
