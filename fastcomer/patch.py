"""patch(model) / unpatch(model): swap CoMER's ARM cross-attention for the fused modules in place,
and route the public CoMER code's decoding to fastcomer's engine.

Works on fastcomer's plain model and on the public CoMER code's model (recognised by
class names and structure, without importing that code): every `TransformerDecoderLayer`
whose `multihead_attn` is a `MultiheadAttention` gets a fused module that owns the same
parameters, so the state dict, the optimiser's parameter list, the training flag and the
ARM's BatchNorm buffers are unchanged. Every public-code `CoMER` in the model (a
`LitCoMER`'s `comer_model` too) gets a `beam_search` that runs `fastcomer.beam_search`
over its own tensors; `LitCoMER.approximate_joint_search`, which calls it, is then fast
without a line changed. Every public-code `DenseNet` dense block (an nn.Sequential of
Bottleneck units) becomes a `DenseBlock` over the same units (same parameter names), which
computes into one buffer instead of concatenating.
"""
from typing import List

import torch.nn as nn
from torch import Tensor

from .model.adapt import is_comer_like
from .model.attention import MultiheadAttention
from .model.encoder import DenseBlock, DenseNet, is_bottleneck
from .model.comer import CoMER
from .modules import CoMERFusedARMAttention, FusedARMAttention
from .ops.dispatch import BackendRequest, parse_request
from .search.hypotheses import Hypothesis

_FUSED = (FusedARMAttention, CoMERFusedARMAttention)


def _decoder_layers(model: nn.Module):
    for module in model.modules():
        if type(module).__name__ == "TransformerDecoderLayer" and hasattr(module, "multihead_attn"):
            yield module


class EngineBeamSearch:
    """The public code's `CoMER.beam_search(img, img_mask, beam_size, max_len, alpha,
    early_stopping, temperature, **kwargs)` run by `fastcomer.beam_search` (installed on the
    instance by `patch`). Same answers in the same order, as `Hypothesis` objects (`.seq`,
    `.score`; the score a float where CoMER's is a 0-d tensor). A model in training mode runs
    CoMER's own search: its dropout and batch statistics are not the engine's function."""

    def __init__(self, module: nn.Module, backend: BackendRequest):
        self.module, self.backend = module, backend

    def __call__(self, img: Tensor, img_mask: Tensor, beam_size: int, max_len: int, alpha: float,
                 early_stopping: bool, temperature: float, **kwargs) -> List[Hypothesis]:
        from .search.engine import beam_search

        if self.module.training:
            return type(self.module).beam_search(self.module, img, img_mask, beam_size, max_len, alpha,
                                                 early_stopping, temperature, **kwargs)
        return beam_search(self.module, img, img_mask, beam_size, max_len, alpha, early_stopping, temperature,
                           backend=self.backend)


def _public_comers(model: nn.Module):
    """The public code's CoMER modules in model (they have a beam_search; fastcomer's CoMER has none)."""
    for module in model.modules():
        if is_comer_like(module) and not isinstance(module, CoMER) and callable(getattr(type(module), "beam_search", None)):
            yield module


def _dense_blocks(model: nn.Module):
    """(owner, name, block) of every DenseNet dense block made of Bottleneck units in model."""
    for module in model.modules():
        if type(module).__name__ == "DenseNet":
            for name, block in module.named_children():
                if isinstance(block, nn.Sequential) and len(block) and all(is_bottleneck(u) for u in block):
                    yield module, name, block


def _swap_block(owner: nn.Module, name: str, block: nn.Sequential, kind: type) -> None:
    swapped = kind(*block)  # the same unit modules, so the same parameters and names
    swapped.training = block.training
    setattr(owner, name, swapped)


def patch(model: nn.Module, backend: BackendRequest = None) -> nn.Module:
    """Fuse every decoder layer's cross-attention (with its ARM) in place and route the public
    code's `CoMER.beam_search` (so `LitCoMER.approximate_joint_search`) to fastcomer's engine,
    and its DenseNet's dense blocks to `DenseBlock`s (the same units); returns the model.

    backend: 'auto' (Triton on CUDA float32/16/bf16 tensors, the plain path otherwise),
    'triton' or 'torch'; None reads FASTCOMER_BACKEND at each call. The engine's searches
    get the same backend.
    """
    if backend is not None:
        parse_request(backend)  # reject a bad request now, not at the first forward
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
    for module in _public_comers(model):
        module.beam_search = EngineBeamSearch(module, backend)  # an instance attribute: the class is untouched
    for owner, name, block in list(_dense_blocks(model)):
        if not isinstance(block, DenseBlock):
            _swap_block(owner, name, block, DenseBlock)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put the original attention modules and beam searches back (sharing the current parameters);
    returns the model."""
    for layer in _decoder_layers(model):
        fused = layer.multihead_attn
        if isinstance(fused, _FUSED):
            plain = fused.plain_module
            plain.in_proj_weight, plain.in_proj_bias, plain.out_proj = fused.in_proj_weight, fused.in_proj_bias, fused.out_proj
            plain.train(fused.training)
            layer.multihead_attn = plain
    for module in _public_comers(model):
        if isinstance(module.__dict__.get("beam_search"), EngineBeamSearch):
            del module.__dict__["beam_search"]
    for owner, name, block in list(_dense_blocks(model)):
        if isinstance(block, DenseBlock) and not isinstance(owner, DenseNet):  # fastcomer's own keep theirs
            _swap_block(owner, name, block, nn.Sequential)
    return model
