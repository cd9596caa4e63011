"""Loading CoMER checkpoints without pytorch-lightning or the CoMER code."""
import os
import re
from dataclasses import replace
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import Tensor

from .model.comer import CoMER, CoMERConfig

LIGHTNING_PREFIX = "comer_model."


class CheckpointError(ValueError):
    """A checkpoint that does not describe a CoMER model; the message names the first offending key."""


def _read(source: Union[str, os.PathLike, Mapping[str, Any]], map_location, weights_only: bool) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    try:
        return torch.load(source, map_location=map_location, weights_only=weights_only)
    except Exception as err:  # noqa: BLE001 - torch raises several types for unreadable files
        hint = " (if the file is trusted, pass weights_only=False)" if weights_only else ""
        raise CheckpointError(f"cannot read checkpoint {os.fspath(source)!r}: {err}{hint}") from err


def _model_state(raw: Mapping[str, Any]) -> Dict[str, Tensor]:
    """The model's state dict with CoMER's Lightning prefix removed."""
    state = raw.get("state_dict", raw)
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError("not a CoMER checkpoint: expected a state dict or a Lightning checkpoint with 'state_dict'")
    prefixed = any(k.startswith(LIGHTNING_PREFIX) for k in state)
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(f"key {key!r}: expected a tensor under a string key, got {type(value).__name__}")
        if prefixed:
            if not key.startswith(LIGHTNING_PREFIX):
                raise CheckpointError(f"unexpected key {key!r}: expected every key to start with {LIGHTNING_PREFIX!r}")
            key = key[len(LIGHTNING_PREFIX):]
        out[key] = value
    return out


def _require(state: Mapping[str, Tensor], key: str, dims: int) -> Tensor:
    if key not in state:
        raise CheckpointError(f"missing key {key!r}: needed to infer the model's configuration")
    value = state[key]
    if value.dim() != dims:
        raise CheckpointError(f"key {key!r}: expected a {dims}-d tensor, got shape {tuple(value.shape)}")
    return value


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state for m in [regex.fullmatch(k)] if m})


def infer_config(state: Mapping[str, Tensor], hints: Optional[Mapping[str, Any]] = None) -> CoMERConfig:
    """The configuration a (prefix-free) CoMER state dict was made with, from tensor shapes.

    Shapes do not determine dropout (training only; the published 0.3 is assumed),
    nor nhead when the model has no ARM (the published 8 is assumed), nor which
    coverage a single-coverage ARM uses (taken from `hints`, else an error asks for it).
    """
    default = CoMERConfig()
    hints = hints or {}
    d_model = _require(state, "encoder.norm.weight", 1).shape[0]
    growth_rate = _require(state, "encoder.model.dense1.0.conv2.weight", 4).shape[0]
    num_layers = _count(state, r"encoder\.model\.dense1\.(\d+)\.conv1\.weight")
    num_decoder_layers = _count(state, r"decoder\.model\.layers\.(\d+)\.linear1\.weight")
    dim_feedforward = _require(state, "decoder.model.layers.0.linear1.weight", 2).shape[0]
    vocab_size = _require(state, "decoder.proj.weight", 2).shape[0]
    if "decoder.model.arm.conv.weight" in state:
        nhead, dc = _require(state, "decoder.model.arm.proj.weight", 4).shape[:2]
        in_channels = _require(state, "decoder.model.arm.conv.weight", 4).shape[1]
        if in_channels == 2 * nhead:
            cross, self_ = True, True
        elif in_channels != nhead:
            raise CheckpointError(
                f"key 'decoder.model.arm.conv.weight': expected {nhead} or {2 * nhead} input channels, got {in_channels}"
            )
        elif hints.get("cross_coverage") is not None and hints.get("self_coverage") is not None:
            cross, self_ = bool(hints["cross_coverage"]), bool(hints["self_coverage"])
        else:
            raise CheckpointError(
                "key 'decoder.model.arm.conv.weight': an ARM with one coverage input does not say which; "
                "pass config={'cross_coverage': ..., 'self_coverage': ...}"
            )
    else:
        nhead, dc, cross, self_ = default.nhead, default.dc, False, False
    return CoMERConfig(
        d_model=d_model, growth_rate=growth_rate, num_layers=num_layers, nhead=nhead,
        num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward, dropout=default.dropout,
        dc=dc, cross_coverage=cross, self_coverage=self_, vocab_size=vocab_size,
    )


def _check_state(model: CoMER, state: Mapping[str, Tensor]) -> None:
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise CheckpointError(f"missing key {key!r}: expected a tensor of shape {tuple(value.shape)}")
        if state[key].shape != value.shape:
            raise CheckpointError(f"key {key!r}: expected shape {tuple(value.shape)}, got {tuple(state[key].shape)}")
    for key in state:
        if key not in expected:
            raise CheckpointError(f"unexpected key {key!r}: not a parameter or buffer of CoMER({model.config})")


def load_comer(
    source: Union[str, os.PathLike, Mapping[str, Any]],
    map_location: Optional[Union[str, torch.device]] = None,
    config: Optional[Mapping[str, Any]] = None,
    weights_only: bool = True,
) -> CoMER:
    """Build a CoMER model from a checkpoint, in eval mode.

    `source` is a path or an already loaded object: a Lightning checkpoint (keys under
    'state_dict' prefixed 'comer_model.', hyper-parameters under 'hyper_parameters')
    or a bare state dict with or without the prefix. Without stored hyper-parameters
    the configuration is inferred from tensor shapes; `config` overrides single
    entries either way. The model takes the checkpoint's floating dtype (a float64
    checkpoint gives a float64 model) and the device of its tensors (after `map_location`).
    """
    raw = _read(source, map_location, weights_only)
    state = _model_state(raw)
    hparams = raw.get("hyper_parameters")
    config = dict(config or {})
    unknown = set(config) - set(CoMERConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown config entries {sorted(unknown)}")
    cfg = CoMERConfig.from_dict(hparams) if isinstance(hparams, Mapping) else infer_config(state, config)
    cfg = replace(cfg, **config)
    model = CoMER.from_config(cfg)
    _check_state(model, state)
    reference = state["decoder.proj.weight"]
    if not reference.is_floating_point():
        raise CheckpointError(f"key 'decoder.proj.weight': expected a floating tensor, got {reference.dtype}")
    device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else reference.device
    model = model.to(dtype=reference.dtype, device=device)
    model.load_state_dict(state)
    return model.eval()
