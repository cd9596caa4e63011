"""StepGraphs' use of torch.cuda, recorded on the CPU with fakes of the calls it makes."""
import contextlib

import torch

from fastcomer.search.cuda_graphs import StepGraphs


class _FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


class _FakeStream:
    def wait_stream(self, other):
        pass


def test_captures_in_thread_local_mode(monkeypatch):
    """Concurrent searches capture while other threads allocate and sync: a capture in the
    default "global" mode would fail with "operation not permitted when stream is capturing"."""
    captures = []

    @contextlib.contextmanager
    def graph(cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        captures.append(capture_error_mode)
        yield

    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    steps = []
    graphs = StepGraphs(steps.append, enabled=True)
    for _ in range(3):  # warm-up on the side stream, capture (+ replay), replay
        graphs(4)
    assert steps == [4, 4]  # eagerly, then once under capture
    assert captures == ["thread_local"]
    assert graphs.graphs[4].replays == 2
