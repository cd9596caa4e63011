"""fastcomer.ops.arm_attention through Triton's interpreter against the plain path
(fastcomer.model in float64), on small odd shapes."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/run.sh sets it too)

import pytest
import torch

from fastcomer.ops import ARMWeights, arm_attention

from arm_cases import check_layer, grads_of, make_arm, make_inputs, make_mask, plain_layer
from conftest import assert_close_rel

RTOL = 1e-5
NHEAD, HEAD_DIM, DC = 2, 8, 4


@pytest.mark.parametrize("coverage", ["cross", "self", "both"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("t, h, w", [(5, 3, 5), (1, 5, 3)])
def test_matches_plain_path(coverage, training, t, h, w):
    check_layer(2, t, h, w, coverage, training, NHEAD, HEAD_DIM, DC, RTOL)


def test_several_tiles_of_l():
    """L = 153 spans two tiles (of 128 positions in the interpreter, 64 on a GPU): the conv
    halo crosses tile boundaries."""
    check_layer(2, 3, 9, 17, "both", True, NHEAD, HEAD_DIM, DC, RTOL)


def test_float16_matches_plain_path():
    """float16 inputs (float32 accumulation and coverage), to float16's precision. bfloat16 is
    tested on CUDA only: the interpreter's tl.dot mishandles bfloat16 operands."""
    check_layer(2, 5, 3, 5, "both", True, NHEAD, HEAD_DIM, DC, 2e-3, dtype=torch.float16)


def test_without_arm_is_plain_attention():
    b, t, h, w = 2, 4, 3, 5
    mask = make_mask(b, h, w)
    (q, k, v, _), upstream = make_inputs(b, NHEAD, HEAD_DIM, t, h, w)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, attn = arm_attention(q, k, v, mask, h, w)
    ref_inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_attn = plain_layer(*ref_inputs, mask, h, None, None, NHEAD)
    assert_close_rel(out, ref_out, RTOL, "output")
    assert_close_rel(attn, ref_attn, RTOL, "attention")
    for name, g, r in zip("qkv", grads_of((out, attn), upstream, [q, k, v]),
                          grads_of((ref_out, ref_attn), [u.double() for u in upstream], ref_inputs)):
        assert_close_rel(g, r, RTOL, f"gradient of {name}")


def test_dropout_is_replayed_in_backward():
    """p > 0: about p of the unmasked weights dropped, the rest scaled by 1/(1-p); the same
    seed gives the same masks; the backward uses the forward's masks (dV = A'^T dO exactly)."""
    b, t, h, w, p = 2, 16, 7, 9, 0.3
    mask = make_mask(b, h, w)
    (q, k, v, prev), (grad_out, _) = make_inputs(b, NHEAD, HEAD_DIM, t, h, w)
    v.requires_grad_()
    arm = make_arm(NHEAD, DC, "both", training=True)
    run = lambda seed: arm_attention(q, k, v, mask, h, w, prev, ARMWeights.from_module(arm), bn_training=True,
                                     dropout_p=p, seed=seed)
    out, attn = run(7)
    out2, attn2 = run(7)
    assert torch.equal(out, out2) and torch.equal(attn, attn2)
    assert not torch.equal(attn, run(8)[1])
    unmasked = (~mask).view(b, 1, 1, -1).expand(b, NHEAD, t, h * w).reshape(attn.shape)
    dropped = (attn[unmasked] == 0).float().mean().item()
    n = unmasked.sum().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / n) ** 0.5, dropped
    (grad_v,) = torch.autograd.grad((out * grad_out).sum(), [v])
    assert_close_rel(grad_v, torch.bmm(attn.detach().transpose(1, 2), grad_out), RTOL, "dV with dropout")


def test_bad_inputs_raise():
    b, t, h, w = 2, 3, 3, 5
    mask = make_mask(b, h, w)
    (q, k, v, prev), _ = make_inputs(b, NHEAD, HEAD_DIM, t, h, w)
    weights = ARMWeights.from_module(make_arm(NHEAD, DC, "both", False))
    with pytest.raises(ValueError, match="height"):
        arm_attention(q, k, v, mask, 4, w, prev, weights)
    with pytest.raises(ValueError, match="prev_attn"):
        arm_attention(q, k, v, mask, h, w, None, weights)
    with pytest.raises(ValueError, match="float64"):
        arm_attention(q.double(), k.double(), v.double(), mask, h, w, prev.double(), weights)
    with pytest.raises(ValueError, match="bool"):
        arm_attention(q, k, v, mask.float(), h, w, prev, weights)
