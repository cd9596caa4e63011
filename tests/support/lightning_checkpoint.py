"""Checkpoint files as CoMER publishes them (pytorch-lightning 1.4), built without Lightning: the
classes that file names are pickled from stand-ins given Lightning's module and class names."""
import contextlib
import os
import sys
import types

import torch


class AttributeDict(dict):
    """Pickled as pytorch_lightning.utilities.parsing.AttributeDict."""

    def __getattr__(self, key):
        return self[key]


class ModelCheckpoint:
    """Pickled as pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint (a dictionary key)."""


_STAND_INS = {
    "pytorch_lightning.utilities.parsing": AttributeDict,
    "pytorch_lightning.callbacks.model_checkpoint": ModelCheckpoint,
}


@contextlib.contextmanager
def lightning_importable():
    """Lightning's module names importable (so pickle can name the classes) while saving only."""
    added = {}
    for module_name, cls in _STAND_INS.items():
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                added[name] = sys.modules[name] = types.ModuleType(name)
        cls.__module__, cls.__qualname__ = module_name, cls.__name__
        setattr(sys.modules[module_name], cls.__name__, cls)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


def save_lightning_checkpoint(path, state, hyper_parameters):
    """A LitCoMER checkpoint as Lightning 1.4 writes it: state under 'comer_model.', the callbacks keyed by
    class, hyper-parameters as an AttributeDict, optimiser and scheduler states."""
    checkpoint = {
        "epoch": 151, "global_step": 57151, "pytorch-lightning_version": "1.4.9",
        "state_dict": {"comer_model." + k: v for k, v in state.items()},
        "callbacks": {ModelCheckpoint: {"monitor": "val_ExpRate", "best_model_score": torch.tensor(0.6365),
                                        "best_model_path": "epoch=151.ckpt", "current_score": torch.tensor(0.6365),
                                        "dirpath": "lightning_logs/version_0/checkpoints"}},
        "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}},
                              "param_groups": [{"lr": 0.08, "momentum": 0.9, "params": [0]}]}],
        "lr_schedulers": [{"mode": "max", "factor": 0.25, "best": 0.6365, "mode_worse": -float("inf")}],
        "hparams_name": "kwargs",
        "hyper_parameters": AttributeDict(hyper_parameters),
    }
    with lightning_importable():
        torch.save(checkpoint, path)


class RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
