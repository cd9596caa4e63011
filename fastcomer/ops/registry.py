"""The table of fastcomer's fused ops: what each computes, which backends implement it, and
where its files are. The dispatch (`ops.dispatch`), the custom ops (`<op>/custom_op.py`), the
static kernel report (`fastcomer.kernel_report`) and the tests read it.

Every op is a package `fastcomer/ops/<name>/` with the same files:
- `__init__.py`: the entry, a function `<name>`: checks the inputs, resolves the backend
  (`ops.dispatch.resolve`) and calls that backend's module, the one place that branches on it;
- `reference.py`: the op in plain PyTorch, a function `<name>` (the `torch` backend, and the
  reference the kernels are tested against);
- `triton_kernel.py`: the Triton kernels and their launcher, a function `<name>`;
- `cuda_kernel.py`, where the CUDA extension (csrc/) implements the op: its launcher `<name>`;
- `custom_op.py`: the op as `torch.ops.fastcomer.<name>`, so that torch.compile and torch.export
  trace a kernel call as one node;
- `variants.py`: `kernel_variants(shapes, arch)`, the Triton launches the static report compiles,
  as `KernelVariant`s: the launcher's own launches (`ops.triton_launch`), recorded on meta tensors.
"""
import dataclasses
import importlib
from typing import Any, Callable, Dict, List, Tuple

# Each backend's module in an op package.
BACKEND_MODULES = {"cuda": "cuda_kernel", "triton": "triton_kernel", "torch": "reference"}


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    """One Triton kernel launch as the static report compiles and rates it: the launch its
    launcher made (`ops.triton_launch.TritonLaunch`, recorded on meta tensors: the kernel, grid,
    arguments, constexprs, warps and stages), and its costs per launch."""

    op: str
    name: str
    launch: Any  # ops.triton_launch.TritonLaunch
    launches: int  # per call of the op
    flops: float  # per launch
    bytes: float  # unique global bytes per launch
    dtype: str  # "fp32", "bf16", ... (the report's dtype mode)

    @property
    def kernel(self) -> Any:
        return self.launch.kernel

    @property
    def grid(self) -> Tuple[int, int, int]:
        """CTAs per launch, as (x, y, z)."""
        return tuple(self.launch.grid) + (1,) * (3 - len(self.launch.grid))


@dataclasses.dataclass(frozen=True)
class Op:
    """A fused op: `name` is its package, its entry and its custom op's name; `backends` are
    its implementations in the order `auto` prefers them (torch, the reference, last)."""

    name: str
    summary: str
    backends: Tuple[str, ...]
    training: bool = False  # differentiable (the training op) rather than a decoding step

    @property
    def package(self) -> str:
        return f"fastcomer.ops.{self.name}"

    @property
    def custom_op(self) -> str:
        return f"fastcomer::{self.name}"

    def entry(self) -> Callable:
        return getattr(importlib.import_module(self.package), self.name)

    def implementation(self, backend: str) -> Callable:
        """The backend's function (importing a kernel module imports triton)."""
        if backend not in self.backends:
            raise ValueError(f"{self.name} has no {backend!r} implementation (it has: {', '.join(self.backends)})")
        return getattr(importlib.import_module(f"{self.package}.{BACKEND_MODULES[backend]}"), self.name)

    def kernel_variants(self, shapes: str, arch: int) -> List[KernelVariant]:
        """The op's Triton launches at the shape set `shapes` (imports triton)."""
        return importlib.import_module(f"{self.package}.variants").kernel_variants(shapes, arch)


OPS: Dict[str, Op] = {op.name: op for op in (
    Op("arm_attention", "training: cross-attention with the ARM refinement, forward and backward",
       ("triton", "torch"), training=True),
    Op("self_attention_step", "decoding: a layer's self-attention block for the newest token of every row",
       ("triton", "torch")),
    Op("cross_attention_step", "decoding: a layer's cross-attention with the ARM for the newest token of every row",
       ("cuda", "triton", "torch")),
    Op("feed_forward_step", "decoding: a layer's out projection, norm2, feed-forward block and norm3",
       ("triton", "torch")),
    Op("beam_scorer_step", "decoding: the beam scorer of one beam step (top-k, finished lists, next beams)",
       ("triton", "torch")),
)}

# The ops one decoding step runs, in order.
DECODING_OPS = tuple(name for name, op in OPS.items() if not op.training)

