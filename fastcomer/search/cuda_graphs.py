"""Replaying a decoding step as CUDA graphs, one per prefix window.

The step (`SearchSlots.step`) only touches static buffers and keeps its counters on the
device, so a graph captured once replays every later step of the same window. The first
call of a window runs eagerly on a side stream (lazy initialisation, Triton compilation
and cuBLAS workspaces happen there, outside any capture); the second captures and
replays. If a capture fails, a warning says why and the steps run eagerly: the same
kernels in the same order, so the same results.

Captures are thread-local: searches run concurrently (one per thread), and in CUDA's default
"global" mode another thread's host sync or cudaMalloc during a capture would fail (or
invalidate) it.
"""
import warnings
from typing import Callable, Dict, Optional

import torch

from ..ops.triton_launch import on_device


class StepGraphs:
    """`device`: the search's; the side stream, the capture stream and the capture are made
    on it, not on the current device."""

    def __init__(self, step: Callable[[int], None], enabled: bool, device: Optional[torch.device] = None):
        self.step = step
        self.enabled = enabled
        self.device = device
        self.graphs: Dict[int, "torch.cuda.CUDAGraph"] = {}
        self.warm = set()
        self.pool = torch.cuda.graph_pool_handle() if enabled else None  # the windows' graphs run one at a time

    def __call__(self, window: int) -> None:
        if not self.enabled:
            self.step(window)
            return
        with on_device(self.device):
            self._run(window)

    def _run(self, window: int) -> None:
        if window in self.graphs:
            self.graphs[window].replay()
        elif window not in self.warm:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(window)
            torch.cuda.current_stream().wait_stream(side)
            self.warm.add(window)
        else:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    self.step(window)
            except RuntimeError as err:  # capture records, it does not run: the state is untouched
                warnings.warn(f"fastcomer: CUDA graph capture failed, decoding eagerly instead: {err}")
                self.enabled = False
                self.step(window)
                return
            self.graphs[window] = graph
            graph.replay()
