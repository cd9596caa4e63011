"""Backend choice and input checks of the fused decode step, and the environment report (CPU)."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from decode_step_cases import clone, make_step
from fastcomer import env_report
from fastcomer.ops.decode_step_cuda import unsupported_reason
from fastcomer.ops.decode_step_dispatch import check_inputs, fused_cross_attention_step


def test_auto_runs_cpu_tensors_on_torch(monkeypatch):
    monkeypatch.delenv("FASTCOMER_BACKEND", raising=False)
    step = make_step(2, "both", "middle")
    expected_step, auto_step = clone(step), clone(step)
    expected = fused_cross_attention_step(**expected_step, backend="torch")
    assert torch.equal(fused_cross_attention_step(**auto_step), expected)
    assert torch.equal(auto_step["coverage"], expected_step["coverage"])


def test_forcing_a_backend_that_cannot_run_raises(monkeypatch):
    step = make_step(2, "both", "middle")
    with pytest.raises(RuntimeError, match="backend 'cuda' was forced"):
        fused_cross_attention_step(**step, backend="cuda")
    monkeypatch.setenv("FASTCOMER_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' was forced"):
        fused_cross_attention_step(**step)
    with pytest.raises(ValueError, match="must be one of"):
        fused_cross_attention_step(**step, backend="cudnn")


def test_float64_runs_on_torch_under_auto_only():
    step = make_step(2, "cross", "last")
    step.update({name: step[name].double() for name in ("q", "k", "v")})
    assert fused_cross_attention_step(**step, backend="auto").dtype == torch.float64
    with pytest.raises(ValueError, match="backend 'triton' supports"):
        fused_cross_attention_step(**step, backend="triton")


def test_unsupported_shapes_for_the_cuda_build_are_named():
    step = make_step(2, "both", "middle")
    shape = check_inputs(**step)
    assert unsupported_reason(shape, step["q"], step["coverage"], step["next_coverage"]) is None
    assert "nhead 3" in unsupported_reason(shape._replace(nhead=3), step["q"], None, None)
    assert "head_dim 256" in unsupported_reason(shape._replace(head_dim=256), step["q"], None, None)
    assert "dc 64" in unsupported_reason(shape._replace(dc=64), step["q"], None, None)
    assert "float64" in unsupported_reason(shape, step["q"].double(), None, None)
    assert "coverage in torch.float16" in unsupported_reason(shape, step["q"], step["coverage"].half(), None)


def test_inputs_are_checked_with_clear_messages():
    step = make_step(2, "both", "middle")
    cases = [
        (dict(q=step["q"][0]), "q must be"),
        (dict(k=step["k"][:, :1]), "k must be"),
        (dict(v=step["v"][:, :, :3]), "v must have k's shape"),
        (dict(q=step["q"].double()), "share a dtype"),
        (dict(key_padding_mask=step["key_padding_mask"].int()), "key_padding_mask must be bool"),
        (dict(arm=None), "without the ARM"),
        (dict(next_coverage=step["next_coverage"].transpose(0, 1).contiguous().transpose(0, 1)), "must be contiguous"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            fused_cross_attention_step(**{**step, **change}, backend="torch")


def test_env_report_and_command():
    report = env_report()
    assert report["torch"] == torch.__version__
    assert set(report["backends"]) == {"cuda", "triton", "torch"} and report["backends"]["torch"] == "ok"
    result = subprocess.run([sys.executable, "-m", "fastcomer", "env", "--json"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["backends"]["torch"] == "ok"
