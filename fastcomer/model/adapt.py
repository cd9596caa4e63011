"""One place that turns any CoMER-shaped module into fastcomer's `CoMER`.

The search functions (`beam_search`, `greedy_search`, `decode_images`, `recognize`) and
`load_comer` accept fastcomer's `CoMER`, the public CoMER code's `CoMER`, or its
`LitCoMER` (its `comer_model` is the CoMER). The public code is recognised by structure
(an `encoder`, a `decoder` with `model.layers` and `proj`), never imported. For it
`as_comer` returns a *view*: a fastcomer `CoMER` whose parameters and buffers are the
source's very tensors (not copies), so an optimiser step, `load_state_dict` or `.to()` on
the source is seen by the next search, and whose modules follow the source's training flags.
"""
import weakref
from typing import Dict

import torch
import torch.nn as nn
from torch import Tensor

from .comer import CoMER, CoMERConfig

# source module -> its view; the view holds the source's tensors, not the source itself
_views: "weakref.WeakKeyDictionary[nn.Module, CoMER]" = weakref.WeakKeyDictionary()


def is_comer_like(module) -> bool:
    """Whether `module` has CoMER's structure (fastcomer's model or the public code's)."""
    decoder = getattr(module, "decoder", None)
    return (
        isinstance(module, nn.Module)
        and isinstance(getattr(module, "encoder", None), nn.Module)
        and isinstance(decoder, nn.Module)
        and isinstance(getattr(getattr(decoder, "model", None), "layers", None), nn.ModuleList)
        and isinstance(getattr(decoder, "proj", None), nn.Linear)
    )


def comer_module(model) -> nn.Module:
    """The CoMER-shaped module of `model`: the model itself, or a LitCoMER's `comer_model`;
    of a torch.compile'd module (its `_orig_mod`), the module compiled: the searches run
    their own step, never the compiled graph."""
    while isinstance(model, nn.Module) and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    if is_comer_like(model):
        return model
    inner = getattr(model, "comer_model", None)
    if isinstance(model, nn.Module) and is_comer_like(inner):
        return inner
    raise TypeError(
        "model must be fastcomer's CoMER, the public CoMER code's CoMER or its LitCoMER (a module with "
        f"encoder and decoder, or comer_model), got {type(model).__qualname__}"
    )


def _tensors(module: nn.Module) -> Dict[str, Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _config_of(source: nn.Module) -> CoMERConfig:
    """The configuration, read from the source's modules (CoMER's attribute names)."""
    decoder, layers = source.decoder, source.decoder.model.layers
    arm = decoder.model.arm
    try:
        return CoMERConfig(
            d_model=source.encoder.norm.normalized_shape[0],
            growth_rate=source.encoder.model.dense1[0].conv2.out_channels,
            num_layers=len(source.encoder.model.dense1),
            nhead=layers[0].self_attn.num_heads,
            num_decoder_layers=len(layers),
            dim_feedforward=layers[0].linear1.out_features,
            dropout=layers[0].dropout.p,
            dc=32 if arm is None else arm.conv.out_channels,  # no ARM: the published value, unused
            cross_coverage=arm is not None and bool(arm.cross_coverage),
            self_coverage=arm is not None and bool(arm.self_coverage),
            vocab_size=decoder.proj.out_features,
        )
    except (AttributeError, IndexError, TypeError) as err:
        raise TypeError(f"{type(source).__qualname__} does not have CoMER's modules: {err}") from None


def _build_view(source: nn.Module, tensors: Dict[str, Tensor]) -> CoMER:
    with torch.device("meta"):  # no memory, no initialisation: every tensor is replaced below
        view = CoMER.from_config(_config_of(source))
    expected = _tensors(view)
    if expected.keys() != tensors.keys():
        extra, missing = sorted(tensors.keys() - expected.keys()), sorted(expected.keys() - tensors.keys())
        raise TypeError(f"{type(source).__qualname__} does not have CoMER's parameters: "
                        f"unexpected {extra[:3]}, missing {missing[:3]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise TypeError(f"{type(source).__qualname__}: {name} has shape {tuple(tensor.shape)}, "
                            f"CoMER({view.config}) expects {tuple(expected[name].shape)}")
        owner_name, _, leaf = name.rpartition(".")
        owner = view.get_submodule(owner_name)
        slot = owner._parameters if leaf in owner._parameters else owner._buffers
        slot[leaf] = tensor
    return view


def _bound(view: CoMER, tensors: Dict[str, Tensor]) -> bool:
    current = _tensors(view)
    return current.keys() == tensors.keys() and all(current[k] is t for k, t in tensors.items())


def _follow_training_flags(view: CoMER, source: nn.Module) -> None:
    modules = dict(source.named_modules())
    for name, module in view.named_modules():
        if name in modules:
            module.training = modules[name].training


def as_comer(model, fresh: bool = False) -> CoMER:
    """fastcomer's CoMER for `model` (see the module docstring): the model itself when it is
    one, else a view over its tensors, kept per source and rebuilt when a tensor was replaced
    (`.to()` replaces buffers); fresh=True builds a new view not kept for later calls."""
    if isinstance(model, CoMER):
        return model
    source = comer_module(model)
    if isinstance(source, CoMER):
        return source
    tensors = _tensors(source)
    view = None if fresh else _views.get(source)
    if view is None or not _bound(view, tensors):
        view = _build_view(source, tensors)
        if not fresh:
            _views[source] = view
    _follow_training_flags(view, source)
    return view

