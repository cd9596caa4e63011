"""How the engine runs a search, apart from what it computes (`SearchOptions`): which backend
each op runs, CUDA graphs, CPU threads. Checked in one place, before any work."""
import dataclasses
from typing import Optional

import torch

from ..ops.dispatch import BackendRequest, DispatchPlan, decoding_plan, parse_request, use_cuda_graphs
from .threads import search_threads


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """backend: 'auto' | 'cuda' | 'triton' | 'torch', or op -> backend (None reads
    FASTCOMER_BACKEND; `fastcomer.ops.dispatch`); graphs: replay the steps as CUDA graphs
    (None reads FASTCOMER_CUDA_GRAPHS, auto = on CUDA); threads: torch's intra-op threads
    during the search (None reads FASTCOMER_THREADS, default 1; `fastcomer.search.threads`).
    `device`: the model's; every knob is checked against it on construction."""

    device: torch.device
    backend: BackendRequest = None
    graphs: Optional[bool] = None
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        parse_request(self.backend)
        use_cuda_graphs(self.device, self.graphs)
        search_threads(self.threads)

    def plan(self, decoder, feature: torch.Tensor, graphs: Optional[bool] = None) -> DispatchPlan:
        """The search's plan over the encoder's features (`decoding_plan`); graphs overrides
        the option (the greedy search, which runs without)."""
        return decoding_plan(decoder, feature, self.backend, self.graphs if graphs is None else graphs)
