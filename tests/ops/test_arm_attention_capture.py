"""arm_attention under a CUDA graph capture, the capture faked on the CPU: its dropout seed is
a host integer baked into the launches, so a captured training step is refused."""
import pytest
import torch

from fastcomer.ops.arm_attention import ARMWeights, arm_attention
from support.arm_cases import make_arm, make_inputs, make_mask


@pytest.fixture()
def capturing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def _call(dropout_p):
    (q, k, v, prev), _ = make_inputs(1, 2, 4, 3, 2, 3)
    arm = ARMWeights.from_module(make_arm(2, 4, "both", training=False))
    return arm_attention(q, k, v, make_mask(1, 2, 3), 2, 3, prev, arm, dropout_p=dropout_p, backend="torch")


def test_dropout_is_refused_under_capture(capturing):
    with pytest.raises(RuntimeError, match="dropout cannot be captured in a CUDA graph"):
        _call(0.1)


def test_without_dropout_capture_is_allowed(capturing):
    out, attn = _call(0.0)
    assert out.shape == (2, 3, 4) and attn.shape == (2, 3, 6)
