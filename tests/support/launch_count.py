"""Counting the kernel launches of a piece of device work, on CPU.

The counting rule, what a CUDA run of the same code would launch:
- every Triton kernel launch counts one (under TRITON_INTERPRET=1 the interpreter's own copies
  of the arguments to and from the host are not counted);
- every other aten op reaching the dispatcher counts one, except views (`OpOverload.is_view`)
  and ops that only allocate or touch metadata (`METADATA_OPS`): a cuBLAS GEMM, an
  elementwise op, a reduction, a copy, a fill, an index op each count one. Ops that launch
  more than one kernel on CUDA (sort, topk: a few each) still count one, so the count is a
  lower bound of CUDA's.
The count depends on the code path, not on the sizes (no op here is split by size), so a small
model with the published structure (layers, rows) counts what the published one does.
"""
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
METADATA_OPS = {
    aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.empty_like.default, aten.detach.default, aten.alias.default,
    aten.lift_fresh.default, aten.set_.source_Storage_storage_offset, aten.resize_.default,
    aten._unsafe_view.default,
}


class LaunchCounter(TorchDispatchMode):
    """Counts launches by op name (`launches`, a Counter; Triton kernels as 'triton:<name>')."""

    def __init__(self):
        super().__init__()
        self.launches: Counter = Counter()
        self._in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._in_triton and not func.is_view and func not in METADATA_OPS:
            self.launches[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.launches.values())


@contextmanager
def counting_launches() -> Iterator[LaunchCounter]:
    """Counts the launches of the work done inside (the interpreter's Triton launches included)."""
    from triton.runtime import interpreter

    counter = LaunchCounter()
    launch = interpreter.GridExecutor.__call__

    def counted_launch(self, *args, **kwargs):
        counter.launches[f"triton:{self.fn.__name__}"] += 1
        counter._in_triton += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            counter._in_triton -= 1

    interpreter.GridExecutor.__call__ = counted_launch
    try:
        with counter:
            yield counter
    finally:
        interpreter.GridExecutor.__call__ = launch
