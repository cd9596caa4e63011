"""The feed-forward step as a torch.library custom op (`torch.ops.fastcomer.feed_forward_step`),
so that torch.compile and torch.export trace a kernel call as one node with a fake
implementation. The op takes the layer's tensors (`FeedForwardWeights`) and rebuilds the layer
the entry reads from them (`ops.layer_view`).

`feed_forward_step_op` is what the decoding engine calls: the plain-PyTorch backend runs the
entry directly, so that compilers and exporters see its operations; traced, the kernel backends
go through the op; eager calls skip it.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from ..layer_view import Attention, DecoderLayer, LayerNorm, Linear
from ..registry import OPS
from ..tracing import is_tracing
from . import feed_forward_step


class FeedForwardWeights(NamedTuple):
    """What the step reads of a decoder layer: the cross-attention's out projection, norm2,
    linear1, linear2 and norm3."""

    out_proj_weight: Tensor
    out_proj_bias: Tensor
    norm2_weight: Tensor
    norm2_bias: Tensor
    norm2_eps: float
    linear1_weight: Tensor
    linear1_bias: Tensor
    linear2_weight: Tensor
    linear2_bias: Tensor
    norm3_weight: Tensor
    norm3_bias: Tensor
    norm3_eps: float

    @classmethod
    def from_layer(cls, layer) -> "FeedForwardWeights":
        out_proj, norm2, norm3 = layer.multihead_attn.out_proj, layer.norm2, layer.norm3
        return cls(out_proj.weight, out_proj.bias, norm2.weight, norm2.bias, norm2.eps, layer.linear1.weight,
                   layer.linear1.bias, layer.linear2.weight, layer.linear2.bias, norm3.weight, norm3.bias, norm3.eps)

    def layer(self) -> DecoderLayer:
        # of the cross-attention the step reads its out projection alone
        out_proj = Linear(self.out_proj_weight, self.out_proj_bias)
        return DecoderLayer(
            multihead_attn=Attention(None, None, out_proj, num_heads=1),
            norm2=LayerNorm(self.norm2_weight, self.norm2_bias, self.norm2_eps),
            norm3=LayerNorm(self.norm3_weight, self.norm3_bias, self.norm3_eps),
            linear1=Linear(self.linear1_weight, self.linear1_bias),
            linear2=Linear(self.linear2_weight, self.linear2_bias),
        )


@torch.library.custom_op(OPS["feed_forward_step"].custom_op, mutates_args=())
def _feed_forward_step_op(
    x: Tensor, attended: Tensor, out_proj_weight: Tensor, out_proj_bias: Tensor, norm2_weight: Tensor,
    norm2_bias: Tensor, norm2_eps: float, linear1_weight: Tensor, linear1_bias: Tensor, linear2_weight: Tensor,
    linear2_bias: Tensor, norm3_weight: Tensor, norm3_bias: Tensor, norm3_eps: float, backend: str,
) -> Tensor:
    layer = FeedForwardWeights(out_proj_weight, out_proj_bias, norm2_weight, norm2_bias, norm2_eps, linear1_weight,
                               linear1_bias, linear2_weight, linear2_bias, norm3_weight, norm3_bias, norm3_eps).layer()
    return feed_forward_step(x, attended, layer, backend=backend)


@_feed_forward_step_op.register_fake
def _(x, *rest):
    return x.new_empty(x.shape)


def feed_forward_step_op(x: Tensor, attended: Tensor, layer, backend: str) -> Tensor:
    """`feed_forward_step` (same arguments and result) for a resolved backend ('torch' or
    'triton'): traced, the kernel as the custom op and 'torch' inline; eager, the entry itself."""
    if backend == "torch" or not is_tracing(x):
        return feed_forward_step(x, attended, layer, backend=backend)
    return torch.ops.fastcomer.feed_forward_step(x, attended, *FeedForwardWeights.from_layer(layer), backend)
