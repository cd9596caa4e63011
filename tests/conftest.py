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


@pytest.fixture(scope="session")
def golden_reference_search(golden):
    """fastcomer.reference_beam_search on the golden inputs and settings, computed once per run
    (the reference's own test and the engine's golden test both read it; its own model, as
    golden_model's, so that no test's model is shared)."""
    from fastcomer import load_comer, reference_beam_search

    model = load_comer(golden, config={"dropout": 0.0})
    return reference_beam_search(model, golden["imgs"], golden["img_mask"], **golden["beam_config"], return_details=True)
