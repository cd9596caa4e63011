"""Which implementation runs an op: the CUDA extension, Triton kernels or plain PyTorch.

Chosen per call from the inputs (`auto`), or forced by an argument or by the
environment variable FASTCOMER_BACKEND=auto|cuda|triton|torch. Forcing a backend that
cannot run the given inputs raises; it never falls back silently. Under `auto`, inputs
a kernel does not support (CPU tensors, float64) take the plain path, which computes
the same function at least as precisely.
"""
import importlib.util
import os
from functools import lru_cache
from typing import Optional, Tuple

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")
ENV_VAR = "FASTCOMER_BACKEND"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def requested_backend(explicit: Optional[str] = None) -> str:
    name = explicit if explicit is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        source = "backend argument" if explicit is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


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


def resolve(tensor: torch.Tensor, explicit: Optional[str] = None, cuda_available: bool = False) -> str:
    """The backend that runs an op on `tensor`: 'cuda', 'triton' or 'torch'."""
    name = requested_backend(explicit)
    kernel_dtype = tensor.dtype in KERNEL_DTYPES
    if name == "torch":
        return "torch"
    if name == "auto":
        if not tensor.is_cuda or not kernel_dtype:
            return "torch"
        if cuda_available:
            return "cuda"
        return "triton" if triton_status()[0] else "torch"
    if not kernel_dtype:
        raise ValueError(f"backend {name!r} supports {', '.join(map(str, KERNEL_DTYPES))}, got {tensor.dtype}")
    if name == "triton":
        usable, why = triton_status()
        if not usable:
            raise RuntimeError(f"backend 'triton' was forced but cannot run: {why}")
        if not tensor.is_cuda and not triton_interpreter():
            raise RuntimeError("backend 'triton' was forced on CPU tensors: set TRITON_INTERPRET=1 before importing triton")
        return "triton"
    if not cuda_available:
        raise RuntimeError("backend 'cuda' was forced but the fastcomer CUDA extension is not built (see fastcomer.env_report())")
    if not tensor.is_cuda:
        raise RuntimeError("backend 'cuda' was forced on CPU tensors")
    return "cuda"
