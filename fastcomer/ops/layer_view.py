"""A decoder layer rebuilt from plain tensors, for the decoding steps' custom ops
(`self_attention_step/custom_op.py`, `feed_forward_step/custom_op.py`): an op's schema takes
tensors and numbers, while the entries read a `model.decoder.TransformerDecoderLayer`'s
attributes. The views have the attributes the entries (reference and kernels) read and borrow
the layer's own methods, so that the math stays in `model/`; dropout is the identity, as in
every decoding step (eval mode)."""
from typing import NamedTuple, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor

from ..model.attention import MultiheadAttention
from ..model.decoder import TransformerDecoderLayer


class Linear(NamedTuple):
    weight: Tensor
    bias: Tensor

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class LayerNorm(NamedTuple):
    weight: Tensor
    bias: Tensor
    eps: float

    @property
    def normalized_shape(self) -> Tuple[int, ...]:
        return tuple(self.weight.shape)

    def __call__(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Attention(NamedTuple):
    in_proj_weight: Optional[Tensor]  # [3d, d]
    in_proj_bias: Optional[Tensor]
    out_proj: Optional[Linear]
    num_heads: int

    @property
    def embed_dim(self) -> int:
        return self.in_proj_weight.shape[1]

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    project_query = MultiheadAttention.project_query


def _identity(x: Tensor) -> Tensor:
    return x


class DecoderLayer(NamedTuple):
    """The parts of a decoder layer one op reads (the others None)."""

    self_attn: Optional[Attention] = None
    multihead_attn: Optional[Attention] = None
    norm1: Optional[LayerNorm] = None
    norm2: Optional[LayerNorm] = None
    norm3: Optional[LayerNorm] = None
    linear1: Optional[Linear] = None
    linear2: Optional[Linear] = None

    dropout = dropout3 = staticmethod(_identity)
    feed_forward = TransformerDecoderLayer.feed_forward
