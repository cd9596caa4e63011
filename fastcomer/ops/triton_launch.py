"""The one place every Triton kernel of `fastcomer.ops` is launched from.

A launcher builds a `TritonLaunch` (the kernel, its grid, its arguments and launch options, as
`kernel[grid](*args, **options)` takes them) and calls `run()`, which launches it on the device
of its tensors (`on_device`): Triton launches on the current CUDA device, so without the guard
a model on cuda:1 would launch on cuda:0 (`torch.cuda.device` is entered only when the devices
differ). The CUDA graphs of a search (`fastcomer.search.cuda_graphs`) use the same guard.

The static kernel report (`fastcomer.kernel_report`) runs the real launchers on meta tensors
inside `recorded()`, which collects the launches instead of running them, and compiles each as
`specialised(arch)` describes it: Triton's own specialisation of those arguments (pointer and
integer divisibility by 16, integers equal to 1 as constants, the default num_stages), so that
the report compiles what a launch on a GPU compiles.
"""
import contextlib
import dataclasses
import threading
from typing import Any, ContextManager, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import torch

__all__ = ["TritonLaunch", "Specialisation", "launch_kernel", "on_device", "recorded"]


class Specialisation(NamedTuple):
    """What `triton.compile` takes for one launch: ASTSource's signature, constexprs and attrs,
    and the backend's options (num_warps, num_stages, ...)."""

    signature: Dict[str, str]
    constexprs: Dict[Tuple[int, ...], Any]
    attrs: Dict[Tuple[int, ...], list]
    options: Any


@dataclasses.dataclass(frozen=True)
class TritonLaunch:
    """One launch, `kernel[grid](*args, **options)`, as a value: run it, or record it."""

    kernel: Any  # a @triton.jit function
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    options: Mapping[str, Any]  # constexprs by name, num_warps, num_stages

    def device(self) -> Optional[torch.device]:
        """The device of the first tensor argument (all of a launch's tensors share it)."""
        return next((a.device for a in self.args if isinstance(a, torch.Tensor)), None)

    def run(self) -> None:
        if _recording.launches is not None:
            _recording.launches.append(self)
            return
        with on_device(self.device()):
            self.kernel[self.grid](*self.args, **self.options)

    def specialised(self, arch: int) -> Specialisation:
        """The launch as Triton specialises it when it compiles it for compute capability `arch`
        (80, 90): the JIT's own binder and argument packing, on the recorded arguments (meta
        tensors report their storage offset as data_ptr, i.e. a 16-aligned allocation)."""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        # Triton's own (internal) binder and packing, not a copy of its rules: the report then
        # follows whatever this Triton specialises on
        kernel = self.kernel
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialisation, _ = binder(*self.args, **self.options)
        options, signature, constexprs, attrs = kernel._pack_args(backend, dict(self.options), bound, specialisation,
                                                                  None)
        return Specialisation(signature, constexprs, attrs, options)


def on_device(device: Optional[torch.device]) -> ContextManager:
    """`torch.cuda.device(device)` when device is a CUDA device other than the current one,
    else nothing (entering a device guard costs a driver call or two per launch)."""
    if device is not None and device.type == "cuda" and device.index is not None \
            and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class _Recording(threading.local):
    launches: Optional[List[TritonLaunch]] = None


_recording = _Recording()


@contextlib.contextmanager
def recorded() -> Iterator[List[TritonLaunch]]:
    """Within the block, this thread's launches are appended to the yielded list, not run."""
    previous, _recording.launches = _recording.launches, []
    try:
        yield _recording.launches
    finally:
        _recording.launches = previous


def launch_kernel(kernel, grid, *args, **options) -> None:
    """`kernel[grid](*args, **options)` through `TritonLaunch.run` (device guard, recording)."""
    TritonLaunch(kernel, tuple(grid), args, options).run()
