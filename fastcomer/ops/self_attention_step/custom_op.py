"""The self-attention step as a torch.library custom op (`torch.ops.fastcomer.self_attention_step`),
so that torch.compile and torch.export trace a kernel call as one node with a fake
implementation. The op takes the layer's tensors (`SelfAttentionWeights`) and rebuilds the
layer the entry reads from them (`ops.layer_view`).

`self_attention_step_op` is what the decoding engine calls: the plain-PyTorch backend runs the
entry directly, so that compilers and exporters see its operations; traced, the kernel backends
go through the op; eager calls skip it.
"""
from typing import NamedTuple, Tuple

import torch
from torch import Tensor

from ..layer_view import Attention, DecoderLayer, LayerNorm, Linear
from ..registry import OPS
from ..tracing import is_tracing
from . import self_attention_step


class SelfAttentionWeights(NamedTuple):
    """What the step reads of a decoder layer: its self-attention, norm1, and the
    cross-attention's input projection (of which the query's rows)."""

    in_proj_weight: Tensor
    in_proj_bias: Tensor
    out_proj_weight: Tensor
    out_proj_bias: Tensor
    norm1_weight: Tensor
    norm1_bias: Tensor
    norm1_eps: float
    query_in_proj_weight: Tensor
    query_in_proj_bias: Tensor
    nhead: int

    @classmethod
    def from_layer(cls, layer) -> "SelfAttentionWeights":
        attn, cross = layer.self_attn, layer.multihead_attn
        return cls(attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                   layer.norm1.weight, layer.norm1.bias, layer.norm1.eps, cross.in_proj_weight, cross.in_proj_bias,
                   attn.num_heads)

    def layer(self) -> DecoderLayer:
        return DecoderLayer(
            self_attn=Attention(self.in_proj_weight, self.in_proj_bias, Linear(self.out_proj_weight, self.out_proj_bias),
                                self.nhead),
            multihead_attn=Attention(self.query_in_proj_weight, self.query_in_proj_bias, None, self.nhead),
            norm1=LayerNorm(self.norm1_weight, self.norm1_bias, self.norm1_eps),
        )


@torch.library.custom_op(OPS["self_attention_step"].custom_op, mutates_args=("keys", "values"))
def _self_attention_step_op(
    x: Tensor, keys: Tensor, values: Tensor, tokens: Tensor, position: Tensor, window: int,
    in_proj_weight: Tensor, in_proj_bias: Tensor, out_proj_weight: Tensor, out_proj_bias: Tensor,
    norm1_weight: Tensor, norm1_bias: Tensor, norm1_eps: float, query_in_proj_weight: Tensor,
    query_in_proj_bias: Tensor, nhead: int, backend: str,
) -> Tuple[Tensor, Tensor]:
    layer = SelfAttentionWeights(in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, norm1_weight,
                                 norm1_bias, norm1_eps, query_in_proj_weight, query_in_proj_bias, nhead).layer()
    return self_attention_step(x, layer, keys, values, tokens, position, window, backend=backend)


@_self_attention_step_op.register_fake
def _(x, *rest):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def self_attention_step_op(x: Tensor, layer, keys: Tensor, values: Tensor, tokens: Tensor, position: Tensor,
                           window: int, backend: str) -> Tuple[Tensor, Tensor]:
    """`self_attention_step` (same arguments and results) for a resolved backend ('torch' or
    'triton'): traced, the kernel as the custom op and 'torch' inline; eager, the entry itself."""
    if backend == "torch" or not is_tracing(x):
        return self_attention_step(x, layer, keys, values, tokens, position, window, backend=backend)
    return torch.ops.fastcomer.self_attention_step(x, keys, values, tokens, position, window,
                                                   *SelfAttentionWeights.from_layer(layer), backend)
