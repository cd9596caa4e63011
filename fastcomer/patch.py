"""patch(model) / unpatch(model): swap CoMER's ARM cross-attention for the fused modules in place.

Works on fastcomer's plain model and on the public CoMER code's model (recognised by
class names and structure, without importing that code): every `TransformerDecoderLayer`
whose `multihead_attn` is a `MultiheadAttention` gets a fused module that owns the same
parameters, so the state dict, the optimiser's parameter list, the training flag and the
ARM's BatchNorm buffers are unchanged.
"""
from typing import Optional

import torch.nn as nn

from .backends import requested_backend
from .model.attention import MultiheadAttention
from .modules import CoMERFusedARMAttention, FusedARMAttention

_FUSED = (FusedARMAttention, CoMERFusedARMAttention)


def _decoder_layers(model: nn.Module):
    for module in model.modules():
        if type(module).__name__ == "TransformerDecoderLayer" and hasattr(module, "multihead_attn"):
            yield module


def patch(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Fuse every decoder layer's cross-attention (with its ARM) in place; returns the model.

    backend: 'auto' (Triton on CUDA float32/16/bf16 tensors, the plain path otherwise),
    'triton' or 'torch'; None reads FASTCOMER_BACKEND at each call.
    """
    if backend is not None:
        requested_backend(backend)  # reject a bad name now, not at the first forward
    found = 0
    for layer in _decoder_layers(model):
        attn = layer.multihead_attn
        if isinstance(attn, _FUSED):
            attn.backend = backend
        elif isinstance(attn, MultiheadAttention):
            layer.multihead_attn = FusedARMAttention.from_module(attn, backend)
        elif type(attn).__name__ == "MultiheadAttention" and hasattr(attn, "in_proj_weight"):
            layer.multihead_attn = CoMERFusedARMAttention.from_module(attn, backend)
        else:
            raise TypeError(f"cannot fuse {type(attn).__qualname__}: expected CoMER's MultiheadAttention")
        found += 1
    if not found:
        raise ValueError("patch() found no CoMER TransformerDecoderLayer with a multihead_attn in the model")
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original attention modules back (sharing the current parameters); returns the model."""
    for layer in _decoder_layers(model):
        fused = layer.multihead_attn
        if isinstance(fused, _FUSED):
            plain = fused.plain_module
            plain.in_proj_weight, plain.in_proj_bias, plain.out_proj = fused.in_proj_weight, fused.in_proj_bias, fused.out_proj
            plain.train(fused.training)
            layer.multihead_attn = plain
    return model
