"""Which implementation runs each fused op: the CUDA extension, Triton kernels or plain PyTorch.

A request is `auto` (the default), one backend for every op (`cuda`, `triton`, `torch`), or a
mapping op -> backend (ops left out are `auto`), given as an argument or by the environment
variable FASTCOMER_BACKEND (`triton`, or `cross_attention_step=cuda,beam_scorer_step=torch`).
`auto` runs the first backend of the op's list (`ops.registry.OPS`) that can run the tensors:
the kernels for CUDA float32/float16/bfloat16 tensors, plain PyTorch for CPU or float64 tensors
(which computes the same function at least as precisely). A forced backend that cannot run
the tensors, or that the op does not have, raises naming the op: nothing falls back silently.

A search resolves its request once, into a `DispatchPlan` (`decoding_plan`): each decoding
op's backend, the dtype of the ARM coverage sums, and whether steps replay as CUDA graphs.
A module call (the training op) resolves once per call (`resolve`).
"""
import dataclasses
import importlib
import importlib.util
import os
import platform
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from ..backends import cuda_extension_status, cuda_extension_usable, triton_interpreter, triton_status
from ..shapes import DC, HEAD_DIM, NHEAD
from .registry import DECODING_OPS, OPS

BACKENDS = ("auto", "cuda", "triton", "torch")
ENV_VAR = "FASTCOMER_BACKEND"
GRAPHS_ENV_VAR = "FASTCOMER_CUDA_GRAPHS"
GRAPHS_SETTINGS = {"auto": None, "1": True, "0": False}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# What a caller may pass as `backend`: None (read FASTCOMER_BACKEND), a name, or op -> name.
BackendRequest = Union[None, str, Mapping[str, str]]


def _backend_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name.strip().lower()


def parse_env_text(text: str, source: str = ENV_VAR) -> Union[str, Mapping[str, str]]:
    """A request written as FASTCOMER_BACKEND takes it: a name, or op=name,op=name."""
    if "=" not in text:
        return _backend_name(text, source)
    request = {}
    for part in text.split(","):
        op, _, name = part.partition("=")
        request[op.strip()] = name
    return _checked_mapping(request, source)


def _checked_mapping(request: Mapping, source: str) -> Mapping[str, str]:
    unknown = sorted(str(op) for op in request if op not in OPS)
    if unknown:
        raise ValueError(f"{source} names unknown op(s) {', '.join(unknown)}; the ops are {', '.join(OPS)}")
    return {op: _backend_name(name, f"{source}[{op!r}]") for op, name in request.items()}


def parse_request(request: BackendRequest) -> Union[str, Mapping[str, str]]:
    """The request checked (ValueError naming what is wrong): a backend name, or op -> name;
    None reads FASTCOMER_BACKEND (default auto)."""
    if request is None:
        return parse_env_text(os.environ.get(ENV_VAR, "auto"))
    if isinstance(request, Mapping):
        return _checked_mapping(request, "backend")
    return _backend_name(request, "backend argument")


def requested_for(op: str, request: BackendRequest) -> str:
    """The backend name the request asks of `op` ('auto' when a mapping leaves it out)."""
    parsed = parse_request(request)
    return parsed.get(op, "auto") if isinstance(parsed, Mapping) else parsed


def resolve(op: str, tensor: torch.Tensor, request: BackendRequest = None,
            cuda_unsupported: Optional[str] = None) -> str:
    """The backend that runs `op` on inputs like `tensor`: 'cuda', 'triton' or 'torch'.
    cuda_unsupported: why the CUDA build cannot take these inputs' shapes (None: it can), for
    an op with a CUDA implementation; `auto` then takes the next backend, a forced 'cuda' raises."""
    spec = OPS[op]
    name = requested_for(op, request)
    if name == "torch":
        return "torch"
    kernel_dtype = tensor.dtype in KERNEL_DTYPES
    if name == "auto":
        if not tensor.is_cuda or not kernel_dtype:
            return "torch"
        for backend in spec.backends:  # looked up only past the plain cases: imports break torch.compile graphs
            if backend == "cuda" and cuda_extension_usable() and cuda_unsupported is None:
                return "cuda"
            if backend == "triton" and triton_status()[0]:
                return "triton"
        return "torch"
    if name not in spec.backends:
        raise ValueError(f"backend {name!r} was forced, but {op} has no {name!r} implementation (it has: "
                         f"{', '.join(spec.backends)}); force one op alone with backend={{{op!r}: ...}}")
    if not kernel_dtype:
        raise ValueError(f"backend {name!r} ({op}) runs {', '.join(map(str, KERNEL_DTYPES))}, got {tensor.dtype}")
    if name == "triton":
        usable, why = triton_status()
        if not usable:
            raise RuntimeError(f"backend 'triton' was forced ({op}) but cannot run: {why}")
        if not tensor.is_cuda and not triton_interpreter():
            raise RuntimeError(f"backend 'triton' was forced ({op}) on CPU tensors: set TRITON_INTERPRET=1 "
                               "before importing triton")
        return "triton"
    if not cuda_extension_usable():
        raise RuntimeError(f"backend 'cuda' was forced ({op}) but cannot run: {cuda_extension_status()[1]} "
                           "(see `fastcomer env`)")
    if not tensor.is_cuda:
        raise RuntimeError(f"backend 'cuda' was forced ({op}) on CPU tensors")
    if cuda_unsupported is not None:
        raise ValueError(f"backend 'cuda' was forced ({op}) but this build cannot run these inputs: {cuda_unsupported}")
    return "cuda"


def use_cuda_graphs(device: torch.device, explicit: Optional[bool] = None) -> bool:
    """Whether a beam search replays its steps as CUDA graphs: `explicit`, else
    FASTCOMER_CUDA_GRAPHS=auto|1|0; auto (the default) means on CUDA devices."""
    if explicit is None:
        setting = os.environ.get(GRAPHS_ENV_VAR, "auto").strip().lower()
        if setting not in GRAPHS_SETTINGS:
            raise ValueError(f"{GRAPHS_ENV_VAR} must be one of {', '.join(GRAPHS_SETTINGS)}, got {setting!r}")
        explicit = GRAPHS_SETTINGS[setting]
    elif not isinstance(explicit, bool):
        raise TypeError(f"graphs must be a bool or None, got {type(explicit).__name__} {explicit!r}")
    if explicit is None:
        return device.type == "cuda"
    if explicit and device.type != "cuda":
        raise ValueError(f"CUDA graphs were requested for a model on {device}")
    return explicit


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """How a search runs: the backend of every decoding op, the dtype of the ARM's coverage
    sums (float32 for the kernels, which keep them so whatever the model's dtype; the model's
    dtype on the torch path), and whether steps replay as CUDA graphs. Made by `decoding_plan`
    (or `of`, from resolved names). Frozen and hashable: the
    engine keys its kept buffers on it."""

    backends: Tuple[Tuple[str, str], ...]  # (op, backend) for every decoding op
    coverage_dtype: torch.dtype
    graphs: bool

    @classmethod
    def of(cls, backends: Union[str, Mapping[str, str]], dtype: torch.dtype, graphs: bool) -> "DispatchPlan":
        """A plan of resolved backends (one name for every decoding op, or op -> name) for a model
        of `dtype`: the coverage dtype follows from the cross-attention step's backend."""
        named = {op: backends if isinstance(backends, str) else backends[op] for op in DECODING_OPS}
        coverage_dtype = dtype if named["cross_attention_step"] == "torch" else torch.float32
        return cls(tuple(named.items()), coverage_dtype, graphs)

    def __getitem__(self, op: str) -> str:
        return dict(self.backends)[op]

    def describe(self) -> str:
        return ", ".join(f"{op}: {backend}" for op, backend in self.backends) + f"; graphs: {self.graphs}"


def cuda_step_unsupported(nhead: int, head_dim: int, dc: int, dtype: torch.dtype) -> Optional[str]:
    """Why the CUDA build cannot run the cross-attention step of a model of these sizes (None: it can)."""
    from .cross_attention_step.cuda_kernel import unsupported_reason  # no triton, no torch.cuda call

    return unsupported_reason(nhead, head_dim, dc, dtype)


def plan_for(device: torch.device, dtype: torch.dtype, nhead: int, head_dim: int, dc: int,
             request: BackendRequest = None, graphs: Optional[bool] = None) -> DispatchPlan:
    """The plan of a search on `device` of a model of `dtype` with these attention sizes (dc 0:
    no ARM): each decoding op resolved once (`resolve`), the coverage dtype, the graphs."""
    parse_request(request)  # a bad request fails here, whatever the device
    like = torch.empty(0, device=device, dtype=dtype)
    unsupported = None
    if like.is_cuda and cuda_extension_usable():
        unsupported = cuda_step_unsupported(nhead, head_dim, dc, dtype)
    backends = {op: resolve(op, like, request, unsupported if op == "cross_attention_step" else None)
                for op in DECODING_OPS}
    return DispatchPlan.of(backends, dtype, use_cuda_graphs(like.device, graphs))


def decoding_plan(decoder, feature: torch.Tensor, request: BackendRequest = None,
                  graphs: Optional[bool] = None) -> DispatchPlan:
    """`plan_for` a search of `decoder` over encoder features like `feature` (their dtype and device)."""
    arm = decoder.model.arm
    return plan_for(feature.device, feature.dtype, decoder.nhead, decoder.proj.in_features // decoder.nhead,
                    0 if arm is None else arm.conv.out_channels, request, graphs)


# The plan `env_report` shows: CoMER's published attention sizes, float32.
PUBLISHED_ATTENTION = dict(nhead=NHEAD, head_dim=HEAD_DIM, dc=DC)


def env_report(request: BackendRequest = None) -> Dict[str, Any]:
    """Versions, devices, whether each kernel backend can run here (and why not), and the plan
    a search would take on each device (float32, CoMER's published sizes) for `request`
    (default: $FASTCOMER_BACKEND); a plan that cannot be made says why."""
    devices = ["cpu"]
    names = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            names.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
            devices.append(f"cuda:{i}")
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
    plans = {}
    for device in devices:
        try:
            plans[device] = plan_for(torch.device(device), torch.float32, request=request,
                                     **PUBLISHED_ATTENTION).describe()
        except (ValueError, RuntimeError, TypeError) as err:
            plans[device] = f"cannot run: {err}"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "fastcomer_C": extension.build_info() if extension is not None else None,
        "devices": names or ["cpu only"],
        "requested_backend": os.environ.get(ENV_VAR, "auto") if request is None else request,
        "cuda_graphs": os.environ.get(GRAPHS_ENV_VAR, "auto"),
        "backends": {
            "cuda": "ok" if cuda_extension_usable() else extension_why,
            "triton": "ok" if triton_ok else triton_why,
            "torch": "ok",
        },
        "ops": {name: ", ".join(op.backends) for name, op in OPS.items()},
        "plan (float32, published sizes)": plans,
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
