"""Which implementation runs an op: the CUDA extension, Triton kernels or plain PyTorch.

Chosen per call from the inputs (`auto`), or forced by an argument or by the
environment variable FASTCOMER_BACKEND=auto|cuda|triton|torch. Forcing a backend that
cannot run the given inputs raises; it never falls back silently. Under `auto`, inputs
a kernel does not support (CPU tensors, float64) take the plain path, which computes
the same function at least as precisely.
"""
import importlib
import importlib.util
import os
import platform
from functools import lru_cache
from typing import Any, Dict, Optional, Tuple

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")
ENV_VAR = "FASTCOMER_BACKEND"
GRAPHS_ENV_VAR = "FASTCOMER_CUDA_GRAPHS"
GRAPHS_SETTINGS = {"auto": None, "1": True, "0": False}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def requested_backend(explicit: Optional[str] = None) -> str:
    name = explicit if explicit is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        source = "backend argument" if explicit is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def use_cuda_graphs(device: torch.device, explicit: Optional[bool] = None) -> bool:
    """Whether the beam search replays its steps as CUDA graphs: `explicit`, else
    FASTCOMER_CUDA_GRAPHS=auto|1|0; auto (the default) means on CUDA devices."""
    if explicit is None:
        setting = os.environ.get(GRAPHS_ENV_VAR, "auto").strip().lower()
        if setting not in GRAPHS_SETTINGS:
            raise ValueError(f"{GRAPHS_ENV_VAR} must be one of {', '.join(GRAPHS_SETTINGS)}, got {setting!r}")
        explicit = GRAPHS_SETTINGS[setting]
    if explicit is None:
        return device.type == "cuda"
    if explicit and device.type != "cuda":
        raise ValueError(f"CUDA graphs were requested for a model on {device}")
    return bool(explicit)


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


def env_report() -> Dict[str, Any]:
    """Versions, devices and, per backend, whether it can run and why not."""
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            devices.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    triton_ok, triton_why = triton_status()
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        try:
            triton_version = importlib.import_module("triton").__version__
        except Exception as err:  # noqa: BLE001 - reported, not raised
            triton_version = f"unimportable: {err}"
    extension, extension_why = cuda_extension_status()
    if extension is not None and not torch.cuda.is_available():
        extension_why = "fastcomer._C loaded, but torch sees no CUDA device"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "fastcomer_C": getattr(extension, "build_info", lambda: None)() if extension is not None else None,
        "devices": devices or ["cpu only"],
        "requested_backend": os.environ.get(ENV_VAR, "auto"),
        "cuda_graphs": os.environ.get(GRAPHS_ENV_VAR, "auto"),
        "backends": {
            "cuda": "ok" if cuda_extension_usable() else extension_why,
            "triton": "ok" if triton_ok else triton_why,
            "torch": "ok",
        },
    }


def format_env_report(report: Dict[str, Any]) -> str:
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            lines += [f"{key}:"] + [f"  {name}: {why}" for name, why in value.items()]
        elif isinstance(value, list):
            lines += [f"{key}:"] + [f"  {item}" for item in value]
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def resolve(tensor: torch.Tensor, explicit: Optional[str] = None, cuda_kernels: bool = True) -> str:
    """The backend that runs an op on `tensor`: 'cuda', 'triton' or 'torch'. cuda_kernels:
    whether the op has a CUDA-extension implementation (the decode step has; the training
    op has not, so 'auto' never picks 'cuda' for it and forcing 'cuda' raises)."""
    name = requested_backend(explicit)
    if name == "torch":
        return "torch"
    kernel_dtype = tensor.dtype in KERNEL_DTYPES
    if name == "auto":
        if not tensor.is_cuda or not kernel_dtype:
            return "torch"
        # looked up only past the plain cases: the import is a graph break under torch.compile
        if cuda_kernels and cuda_extension_usable():
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
    if not cuda_kernels:
        raise ValueError("backend 'cuda' has no implementation of this op (use 'triton' or 'torch')")
    if not cuda_extension_usable():
        raise RuntimeError("backend 'cuda' was forced but the fastcomer CUDA extension is not built (see fastcomer.env_report())")
    if not tensor.is_cuda:
        raise RuntimeError("backend 'cuda' was forced on CPU tensors")
    return "cuda"
