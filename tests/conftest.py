import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    """The golden files made by the public CoMER code: $FASTCOMER_GOLDEN_DIR, else ../shared/golden."""
    return Path(os.environ.get("FASTCOMER_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


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


def assert_close_rel(actual, expected, rtol, what=""):
    """max |actual - expected| <= rtol * max |expected|: relative to the tensor's scale,
    so that entries near zero do not demand more digits than the computation has."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:.0e} * {scale:.3e}"


@pytest.fixture()
def graph_policy(monkeypatch):
    """beam_search as on CUDA with graphs (power-of-two slots, done flags read every few
    steps, batches kept across searches), the steps run eagerly."""
    import fastcomer.search.engine as engine

    monkeypatch.setattr(engine.backends, "use_cuda_graphs", lambda device, explicit=None: True)
    monkeypatch.setattr(engine, "StepGraphs", lambda step, enabled: step)
