"""Fixtures shared by every test directory; helpers live in tests/support."""
import pytest
import torch

from support.paths import golden_dir


@pytest.fixture(scope="session")
def golden():
    path = golden_dir() / "comer_small_seed0.pt"
    if not path.exists():
        pytest.fail(f"golden file not found at {path}; set FASTCOMER_GOLDEN_DIR")
    return torch.load(path, weights_only=False)


@pytest.fixture()
def golden_model(golden):
    """A fresh float64 eval-mode model with the golden weights (dropout 0, as the golden run)."""
    from fastcomer import load_comer

    return load_comer(golden, config={"dropout": 0.0})


@pytest.fixture()
def graph_policy(monkeypatch):
    """beam_search as on CUDA with graphs (power-of-two slots, done flags read every few
    steps, batches kept across searches), the steps run eagerly."""
    from fastcomer.ops import dispatch
    from fastcomer.search import engine_options, search_slots

    monkeypatch.setattr(dispatch, "use_cuda_graphs", lambda device, explicit=None: True)
    monkeypatch.setattr(engine_options, "use_cuda_graphs", lambda device, explicit=None: True)
    monkeypatch.setattr(search_slots, "StepGraphs", lambda step, enabled, device=None: step)
