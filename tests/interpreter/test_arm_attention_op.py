"""fastcomer.ops.arm_attention through Triton's interpreter against the plain path
(fastcomer.model in float64), on small odd shapes."""
import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/run.sh sets it too)

import pytest
import torch

from fastcomer.model.arm import AttentionRefinementModule
from fastcomer.model.attention import masked_softmax
from fastcomer.ops import ARMWeights, arm_attention

from conftest import assert_close_rel

RTOL = 1e-5
NHEAD, HEAD_DIM, DC = 2, 8, 4


def make_mask(b, h, w):
    """Image 0 unpadded; image 1 padded at the bottom and on the right."""
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[1:, h - 1 :, :] = True
    mask[1:, :, w - 2 :] = True
    return mask.view(b, h * w)


def make_arm(coverage, training, seed=0):
    torch.manual_seed(seed)
    arm = AttentionRefinementModule(NHEAD, DC, coverage != "self", coverage != "cross")
    with torch.no_grad():  # running statistics and affine parameters away from identity, so they matter
        bn = arm.post_norm.bn
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
        arm.proj.weight.mul_(3.0)
    return arm.train(training)


def make_inputs(b, t, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    L = h * w
    q = torch.randn(b * NHEAD, t, HEAD_DIM, generator=g)
    k = torch.randn(b * NHEAD, L, HEAD_DIM, generator=g)
    v = torch.randn(b * NHEAD, L, HEAD_DIM, generator=g)
    prev = torch.softmax(2 * torch.randn(b * NHEAD, t, L, generator=g), -1)
    grads = torch.randn(b * NHEAD, t, HEAD_DIM, generator=g), torch.randn(b * NHEAD, t, L, generator=g)
    return [x.requires_grad_() for x in (q, k, v, prev)], grads


def plain_layer(q, k, v, mask, height, prev, arm):
    """CoMER's cross-attention, as fastcomer.model.attention.MultiheadAttention computes it."""
    scores = torch.bmm(q, k.transpose(1, 2))
    attn = masked_softmax(scores, mask, None, NHEAD)
    if arm is not None:
        attn = masked_softmax(scores - arm(prev, mask, height, attn), mask, None, NHEAD)
    return torch.bmm(attn, v), attn


def grads_of(outputs, upstream, tensors):
    loss = sum((o * g).sum() for o, g in zip(outputs, upstream))
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@pytest.mark.parametrize("coverage", ["cross", "self", "both"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("t, h, w", [(5, 3, 5), (1, 5, 3)])
def test_matches_plain_path(coverage, training, t, h, w):
    b = 2
    mask = make_mask(b, h, w)
    (q, k, v, prev), upstream = make_inputs(b, t, h, w)
    arm = make_arm(coverage, training)
    arm64 = copy.deepcopy(arm).double()
    if training and t * int((~mask).sum()) < 2:
        pytest.skip("too few positions for batch statistics")

    out, attn = arm_attention(q, k, v, mask, h, w, prev, ARMWeights.from_module(arm), bn_training=training)
    ref_inputs = [x.detach().double().requires_grad_() for x in (q, k, v, prev)]
    ref_out, ref_attn = plain_layer(*ref_inputs[:3], mask, h, ref_inputs[3], arm64)
    assert out.dtype == attn.dtype == torch.float32
    assert_close_rel(out, ref_out, RTOL, "output")
    assert_close_rel(attn, ref_attn, RTOL, "returned attention")

    bn, bn64 = arm.post_norm.bn, arm64.post_norm.bn
    assert int(bn.num_batches_tracked) == int(bn64.num_batches_tracked) == int(training)
    assert_close_rel(bn.running_mean, bn64.running_mean, RTOL, "running_mean")
    assert_close_rel(bn.running_var, bn64.running_var, RTOL, "running_var")

    # The plain path in float32 too: some ARM gradients are sums with heavy cancellation
    # (exactly 0 for the BatchNorm bias: softmax ignores a shift per head), where float32
    # can only match float64 to its own rounding noise.
    arm32 = copy.deepcopy(arm).train(training)
    inputs32 = [x.detach().clone().requires_grad_() for x in (q, k, v, prev)]
    out32, attn32 = plain_layer(*inputs32[:3], mask, h, inputs32[3], arm32)
    params = lambda m: [m.conv.weight, m.conv.bias, m.proj.weight, m.post_norm.bn.weight, m.post_norm.bn.bias]
    got = grads_of((out, attn), upstream, [q, k, v, prev] + params(arm))
    want = grads_of((ref_out, ref_attn), [u.double() for u in upstream], ref_inputs + params(arm64))
    plain32 = grads_of((out32, attn32), upstream, inputs32 + params(arm32))
    names = ["q", "k", "v", "prev_attn", "conv.weight", "conv.bias", "proj.weight", "bn.weight", "bn.bias"]
    for name, g, r, p32 in zip(names, got, want, plain32):
        if r is None:  # prev_attn does not reach R with self coverage only
            assert g is None or not g.any(), name
            continue
        plain_err = (p32.double() - r).abs().max().item()
        err = (g.double() - r).abs().max().item()
        allowed = max(RTOL * r.abs().max().item(), 4 * plain_err)
        assert err <= allowed, f"gradient of {name}: error {err:.3e} > {allowed:.3e} (plain float32: {plain_err:.3e})"


def test_without_arm_is_plain_attention():
    b, t, h, w = 2, 4, 3, 5
    mask = make_mask(b, h, w)
    (q, k, v, _), upstream = make_inputs(b, t, h, w)
    out, attn = arm_attention(q, k, v, mask, h, w)
    ref_inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_attn = plain_layer(*ref_inputs, mask, h, None, None)
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
    (q, k, v, prev), (grad_out, _) = make_inputs(b, t, h, w)
    arm = make_arm("both", training=True)
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
    (q, k, v, prev), _ = make_inputs(b, t, h, w)
    weights = ARMWeights.from_module(make_arm("both", False))
    with pytest.raises(ValueError, match="height"):
        arm_attention(q, k, v, mask, 4, w, prev, weights)
    with pytest.raises(ValueError, match="prev_attn"):
        arm_attention(q, k, v, mask, h, w, None, weights)
    with pytest.raises(ValueError, match="float64"):
        arm_attention(q.double(), k.double(), v.double(), mask, h, w, prev.double(), weights)
    with pytest.raises(ValueError, match="bool"):
        arm_attention(q, k, v, mask.float(), h, w, prev, weights)
