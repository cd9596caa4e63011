"""Which kernel backends can run here: Triton (importable, and a GPU or its interpreter to
run on) and the compiled CUDA extension `fastcomer._C`. Which backend each op then runs is
`fastcomer.ops.dispatch`'s choice.
"""
import importlib
import importlib.util
import os
from functools import lru_cache
from typing import Any, Optional, Tuple

import torch


def triton_interpreter() -> bool:
    """Whether Triton runs kernels through its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def triton_status() -> Tuple[bool, str]:
    """(usable, reason): Triton importable, and a GPU or the interpreter to run it on."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means no Triton
        return False, f"triton failed to import: {err}"
    if not (torch.cuda.is_available() or triton_interpreter()):
        return False, "no CUDA device and TRITON_INTERPRET is not 1"
    return True, "ok"


@lru_cache(maxsize=None)
def cuda_extension_status() -> Tuple[Optional[Any], str]:
    """(module or None, reason): the compiled extension fastcomer._C (built by setup.py with nvcc)."""
    try:
        module = importlib.import_module("fastcomer._C")
    except ImportError as err:
        return None, f"fastcomer._C is not built or failed to load ({err}); rebuild with FASTCOMER_CUDA=1 pip install ."
    return module, "ok"


def cuda_extension_usable() -> bool:
    """The extension is loaded and a CUDA device is there to run it."""
    return cuda_extension_status()[0] is not None and torch.cuda.is_available()
