"""Loading CoMER checkpoints without pytorch-lightning or the CoMER code."""
import codecs
import collections
import os
import pickle
import re
import types
from dataclasses import fields, replace
from typing import Any, BinaryIO, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .model.adapt import as_comer
from .model.comer import CoMER, CoMERConfig

LIGHTNING_PREFIX = "comer_model."


class CheckpointError(ValueError):
    """A checkpoint that does not describe a CoMER model; the message names the first offending key."""


# What the restricted unpickler lets a checkpoint name: tensors, plain containers, dtypes; nothing
# that runs code. Storages are resolved by torch.load itself before these are consulted.
_SAFE_GLOBALS = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "_codecs.encode": codecs.encode,  # how pickle protocol 2 stores bytes
    **{f"torch.{name}": dtype for name, dtype in vars(torch).items() if isinstance(dtype, torch.dtype)},
}


class AttributeDict(dict):
    """Inert stand-in for Lightning's AttributeDict, in which Lightning stores hyper-parameters."""


_ATTRIBUTE_DICTS = ("pytorch_lightning.utilities.parsing.AttributeDict", "lightning_fabric.utilities.data.AttributeDict",
                    "lightning.fabric.utilities.data.AttributeDict")
# Lightning 1.x keys a checkpoint's `callbacks` by the callback classes themselves.
_CALLBACK_MODULES = ("pytorch_lightning.callbacks.", "lightning.pytorch.callbacks.")
_inert_classes: Dict[str, type] = {}


def _inert_class(qualified: str) -> type:
    """One empty class per callback class name: a dictionary key that runs nothing."""
    if qualified not in _inert_classes:
        _inert_classes[qualified] = type(qualified.rpartition(".")[2], (), {"__module__": "fastcomer.checkpoint.inert"})
    return _inert_classes[qualified]


class RefusedGlobal(pickle.UnpicklingError):
    """A checkpoint names a global the restricted unpickler does not load."""

    def __init__(self, qualified: str):
        super().__init__(f"refused to load {qualified}")
        self.qualified = qualified


class RestrictedUnpickler(pickle.Unpickler):
    """Loads the objects of `_SAFE_GLOBALS` and Lightning's classes (as inert stand-ins); refuses any other."""

    def find_class(self, module: str, name: str):
        qualified = f"{module}.{name}"
        if qualified in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[qualified]
        if qualified in _ATTRIBUTE_DICTS:
            return AttributeDict
        if (module + ".").startswith(_CALLBACK_MODULES):
            return _inert_class(qualified)
        raise RefusedGlobal(qualified)


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# torch.load's pickle_module: the restricted unpickler for both of torch's file formats
restricted_pickle = types.ModuleType("fastcomer.checkpoint.restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load


def _describe(source) -> str:
    return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def _read(source, map_location, weights_only: bool) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        raise TypeError(f"source: got {type(source).__name__} of {len(source)} bytes; "
                        "to load a checkpoint held in memory pass io.BytesIO(data)")
    if not isinstance(source, (str, os.PathLike)) and not callable(getattr(source, "read", None)):
        raise TypeError("source must be a path, a binary file object, a loaded checkpoint (a mapping) or a CoMER "
                        f"module, got {type(source).__name__}")
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        cause = "is a directory" if os.path.isdir(source) else "no such file"
        raise CheckpointError(f"cannot read checkpoint {name}: {cause}")
    if map_location is None and not torch.cuda.is_available():
        map_location = "cpu"  # most published checkpoints hold CUDA tensors
    try:
        if weights_only:
            return torch.load(source, map_location=map_location, weights_only=False, pickle_module=restricted_pickle)
        return torch.load(source, map_location=map_location, weights_only=False)
    except RefusedGlobal as err:
        raise CheckpointError(
            f"cannot read checkpoint {name}: it names {err.qualified}, which fastcomer does not load without running "
            "code from the file; if the file is trusted, pass weights_only=False") from None
    except (pickle.UnpicklingError, EOFError) as err:  # not a pickle or a torch zip archive, or cut short
        raise CheckpointError(f"cannot read checkpoint {name}: not a torch checkpoint, or truncated "
                              f"({_one_line(err)})") from err
    except Exception as err:  # noqa: BLE001 - torch raises several types for unreadable files
        raise CheckpointError(f"cannot read checkpoint {name}: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    """The whole message of err on one line (never cut), with its type."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}" if str(err).strip() else type(err).__name__


def _check_map_location(map_location) -> None:
    """None, a device that exists here, a mapping or a callable (torch.load's forms)."""
    if map_location is None or isinstance(map_location, Mapping) or callable(map_location):
        return
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location must be a device (e.g. 'cpu'), a mapping, a callable or None, "
                        f"got {type(map_location).__name__}")
    try:
        device = torch.device(map_location)
    except (RuntimeError, ValueError):
        raise ValueError(f"map_location: expected a device such as 'cpu' or 'cuda:0', got {map_location!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"map_location={map_location!r}: CUDA is not available here; pass map_location='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"map_location={map_location!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"map_location: expected 'cpu' or 'cuda[:n]', got {map_location!r}")


def _model_state(raw: Mapping[str, Any]) -> Dict[str, Tensor]:
    """The model's state dict with CoMER's Lightning prefix removed."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"not a CoMER checkpoint: expected a mapping, the file holds a {type(raw).__name__}")
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
        if state[key].is_floating_point() != value.is_floating_point():  # never cast weights from integers
            kind = "a floating" if value.is_floating_point() else "an integer"
            raise CheckpointError(f"key {key!r}: expected {kind} tensor, got {state[key].dtype}")
    for key in state:
        if key not in expected:
            raise CheckpointError(f"unexpected key {key!r}: not a parameter or buffer of CoMER({model.config})")


_COVERAGE_FIELDS = ("cross_coverage", "self_coverage")


def _check_config_values(values: Mapping[str, Any], where: str, error: type) -> None:
    """Each CoMER hyper-parameter in values has the right type and range; `where` names the source."""
    for name, value in values.items():
        if name == "dropout":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0
            expected = "a number in [0, 1)"
        elif name in _COVERAGE_FIELDS:
            ok, expected = isinstance(value, bool), "a bool"
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            expected = "a positive int"
        if not ok:
            raise error(f"{where}[{name!r}]: expected {expected}, got {value!r}")


def _model_hyper_parameters(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """The CoMER entries of a checkpoint's hyper_parameters (it also stores search and optimiser settings)."""
    hparams = raw.get("hyper_parameters")
    if hparams is None:
        return {}
    if not isinstance(hparams, Mapping):
        raise CheckpointError(f"'hyper_parameters': expected a mapping, got {type(hparams).__name__}")
    names = {f.name for f in fields(CoMERConfig)}
    found = {k: v for k, v in hparams.items() if k in names}
    _check_config_values(found, "hyper_parameters", CheckpointError)
    return found


def load_comer(
    source: Union[str, os.PathLike, BinaryIO, Mapping[str, Any], nn.Module],
    map_location: Optional[Union[str, torch.device]] = None,
    config: Optional[Mapping[str, Any]] = None,
    weights_only: bool = True,
) -> CoMER:
    """Build a CoMER model from a checkpoint, in eval mode.

    `source` is a path, a binary file object or an already loaded object: a Lightning
    checkpoint (keys under 'state_dict' prefixed 'comer_model.', hyper-parameters under
    'hyper_parameters'), CoMER's published one included, or a bare state dict with or
    without the prefix. The configuration is inferred from tensor shapes; stored
    hyper-parameters (all or some) and then `config` override single entries. The model
    takes the checkpoint's floating dtype (a float64 checkpoint gives a float64 model) and
    the device of its tensors (after `map_location`).

    weights_only (default True): read files with a restricted unpickler that builds tensors,
    plain containers and numbers, and stands in inert classes for Lightning's `AttributeDict`
    and callback classes; any other object named in the file is refused (CheckpointError),
    so nothing in the file runs. False: torch.load's full unpickling, for trusted files only.

    `source` may also be a module: fastcomer's CoMER is returned as it is; the public CoMER
    code's CoMER or LitCoMER gives a fastcomer CoMER over the same parameter tensors (not a
    copy), in eval mode (the source's own flags are left alone).
    """
    if isinstance(source, nn.Module):
        if map_location is not None or config is not None:
            raise TypeError("map_location and config apply to checkpoints, not to a module source")
        model = as_comer(source, fresh=True)
        return model if model is source else model.eval()
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping of CoMER hyper-parameters or None, got {type(config).__name__}")
    config = dict(config or {})
    unknown = set(config) - set(CoMERConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown config entries {sorted(unknown)}")
    _check_config_values(config, "config", ValueError)
    _check_map_location(map_location)
    raw = _read(source, map_location, weights_only)
    state = _model_state(raw)
    stated = {**_model_hyper_parameters(raw), **config}
    cfg = replace(infer_config(state, stated), **stated)
    model = CoMER.from_config(cfg)
    _check_state(model, state)
    reference = state["decoder.proj.weight"]
    device = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else reference.device
    model = model.to(dtype=reference.dtype, device=device)
    model.load_state_dict(state)
    return model.eval()


def read_checkpoint(source: Union[str, os.PathLike, BinaryIO, Mapping[str, Any]], map_location=None,
                    weights_only: bool = True) -> Mapping[str, Any]:
    """The checkpoint object as stored (read as `load_comer` reads it, weights_only alike), for
    what it holds besides the model, such as the search settings in 'hyper_parameters'."""
    return _read(source, map_location, weights_only)
