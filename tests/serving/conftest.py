"""The HTTP tests' model: the golden weights as a checkpoint file (servers: tests/support/servers.py)."""
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def checkpoint(golden, tmp_path_factory) -> Path:
    """The golden weights in float32, as a state-dict checkpoint file."""
    from fastcomer import load_comer

    path = tmp_path_factory.mktemp("serve") / "comer_small.pt"
    torch.save(load_comer(golden, config={"dropout": 0.0}).float().state_dict(), path)
    return path
