"""Drop-in modules running CoMER's cross-attention with the ARM through the fused op.

`FusedARMAttention` replaces fastcomer's plain `MultiheadAttention` (batch-first) and
`CoMERFusedARMAttention` the public CoMER code's `MultiheadAttention` (seq-first, its
call signature). Both keep the `nn.MultiheadAttention` parameter names, so state dicts
are unchanged, and resolve the op's backend once per call (`fastcomer.ops.dispatch.resolve`
on the query, with the module's `backend` or FASTCOMER_BACKEND): 'triton' runs
`fastcomer.ops.arm_attention`, 'torch' runs the plain module's own forward (the function the
op's torch backend computes too). The ARM arrives, as in CoMER, as
`functools.partial(arm_module, prev_attn, key_padding_mask, height)`; the fused path
reads the module and its arguments from it.
"""
import functools
from typing import Optional, Tuple

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .ops.dispatch import BackendRequest, resolve
from .model.attention import MultiheadAttention
from .model.decoder import Decoder, TransformerDecoderLayer


def _unpack_arm(arm) -> Tuple[Optional[nn.Module], Optional[Tensor], Optional[int]]:
    """(ARM module, previous layer's attention, feature-map height) from CoMER's partial."""
    if arm is None:
        return None, None, None
    if (
        not isinstance(arm, functools.partial)
        or type(arm.func).__name__ != "AttentionRefinementModule"
        or len(arm.args) != 3
        or arm.keywords
    ):
        raise TypeError("the fused attention needs arm = functools.partial(AttentionRefinementModule, prev_attn, "
                        f"key_padding_mask, height), as CoMER's decoder passes it; got {arm!r}")
    prev_attn, _, height = arm.args
    return arm.func, prev_attn, int(height)


class _FusedAttentionMixin:
    """The fused computation, shared by both layouts; inputs batch-first."""

    backend: BackendRequest = None

    def fused_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor, arm) -> Tuple[Tensor, Tensor]:
        """query [b, t, d], key and value [b, L, d] -> (out [b, t, d], attention [(b nhead), t, L])."""
        from .ops.arm_attention import ARMWeights
        from .ops.arm_attention.custom_op import arm_attention_op  # one node under torch.compile / export

        if key_padding_mask is None:
            raise ValueError("the fused ARM attention needs memory_key_padding_mask [b, L]")
        arm_module, prev_attn, height = _unpack_arm(arm)
        d, n = self.embed_dim, self.num_heads
        b, t, _ = query.shape
        L = key.shape[1]
        w, bias = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:d], bias[:d]) * (d // n) ** -0.5
        k = F.linear(key, w[d : 2 * d], bias[d : 2 * d])
        v = F.linear(value, w[2 * d :], bias[2 * d :])
        q, k, v = (x.view(b, -1, n, d // n).transpose(1, 2).reshape(b * n, -1, d // n) for x in (q, k, v))
        if arm_module is None:  # the first layer: plain attention, returned for the next layer's ARM
            weights, bn_training, height, width = None, False, 1, L
        else:
            weights = ARMWeights.from_module(arm_module)
            bn_training = arm_module.post_norm.bn.training
            if L % height:
                raise ValueError(f"L = {L} keys do not form an image of height {height}")
            width = L // height
        out, attn = arm_attention_op(
            q, k, v, key_padding_mask, height, width, prev_attn, weights, bn_training=bn_training,
            dropout_p=self.dropout if self.training else 0.0,  # precision: eager's float32 policy
            backend="triton",
        )
        out = out.view(b, n, t, d // n).transpose(1, 2).reshape(b, t, d)
        return self.out_proj(out), attn

    def uses_triton(self, query: Tensor) -> bool:
        return resolve("arm_attention", query, self.backend) == "triton"


def _share_attention_parameters(fused: nn.Module, plain: nn.Module) -> None:
    """The fused module owns the plain module's very parameters (and out_proj)."""
    for name in ("in_proj_weight", "in_proj_bias"):
        setattr(fused, name, getattr(plain, name))
    fused.out_proj = plain.out_proj
    fused.embed_dim, fused.num_heads, fused.dropout = plain.embed_dim, plain.num_heads, plain.dropout
    fused.train(plain.training)
    # kept outside the module tree (not a submodule) so the state dict is unchanged; unpatch() restores it
    object.__setattr__(fused, "plain_module", plain)


class FusedARMAttention(_FusedAttentionMixin, MultiheadAttention):
    """fastcomer's MultiheadAttention (batch-first), its ARM cross-attention fused."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, backend: BackendRequest = None):
        super().__init__(embed_dim, num_heads, dropout)
        self.backend = backend

    @classmethod
    def from_module(cls, plain: MultiheadAttention, backend: BackendRequest = None) -> "FusedARMAttention":
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.head_dim = plain.head_dim
        fused.backend = backend
        _share_attention_parameters(fused, plain)
        return fused

    def forward(self, query, memory, key_padding_mask=None, attn_mask=None, arm=None):
        if not self.uses_triton(query):
            return super().forward(query, memory, key_padding_mask, attn_mask, arm)
        if attn_mask is not None:
            raise ValueError("the fused ARM attention takes no attn_mask (CoMER's cross-attention has none)")
        return self.fused_forward(query, memory, memory, key_padding_mask, arm)


class CoMERFusedARMAttention(_FusedAttentionMixin, nn.Module):
    """The public CoMER code's MultiheadAttention (seq-first [t, b, d], its call signature),
    fused; the plain path is the wrapped CoMER module's own forward."""

    @classmethod
    def from_module(cls, plain: nn.Module, backend: BackendRequest = None) -> "CoMERFusedARMAttention":
        if not getattr(plain, "_qkv_same_embed_dim", True) or getattr(plain, "bias_k", None) is not None \
                or getattr(plain, "add_zero_attn", False):
            raise ValueError("patch() supports CoMER's attention with one in_proj_weight, no bias_k/bias_v, no add_zero_attn")
        fused = cls()
        fused.backend = backend
        _share_attention_parameters(fused, plain)
        return fused

    def forward(self, query, key, value, arm=None, key_padding_mask=None, need_weights=True, attn_mask=None):
        if not self.uses_triton(query):
            plain = self.plain_module
            plain.train(self.training)
            return plain(query, key, value, arm=arm, key_padding_mask=key_padding_mask,
                         need_weights=need_weights, attn_mask=attn_mask)
        if attn_mask is not None:
            raise ValueError("the fused ARM attention takes no attn_mask (CoMER's cross-attention has none)")
        out, attn = self.fused_forward(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                       key_padding_mask, arm)
        return out.transpose(0, 1), (attn if need_weights else None)


class FusedTransformerDecoderLayer(TransformerDecoderLayer):
    """fastcomer's decoder layer with the fused cross-attention (same parameter names)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, backend: BackendRequest = None):
        super().__init__(d_model, nhead, dim_feedforward, dropout)
        self.multihead_attn = FusedARMAttention.from_module(self.multihead_attn, backend)


class FusedDecoder(Decoder):
    """fastcomer's CoMER decoder with every cross-attention fused (same parameter names)."""

    def __init__(self, *args, backend: BackendRequest = None, **kwargs):
        super().__init__(*args, **kwargs)
        for layer in self.model.layers:
            layer.multihead_attn = FusedARMAttention.from_module(layer.multihead_attn, backend)
