"""The layer's tail of one decoding step in plain PyTorch: the torch backend and the reference of
the kernel."""
from torch import Tensor


def feed_forward_step(x: Tensor, attended: Tensor, layer) -> Tensor:
    """See `fastcomer.ops.feed_forward_step.feed_forward_step`."""
    return layer.feed_forward(layer.norm2(x + layer.multihead_attn.out_proj(attended)))
