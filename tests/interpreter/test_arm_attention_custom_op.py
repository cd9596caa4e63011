"""The custom op torch.ops.fastcomer.arm_attention (the path torch.compile traces) run for
real through Triton's interpreter: forward, BatchNorm running statistics and the registered
autograd formula (the backward op) equal the entry `arm_attention` and its autograd Function."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/run.sh sets it too)

import pytest
import torch

from fastcomer.ops.arm_attention import ARMWeights, arm_attention
from fastcomer.ops.arm_attention.custom_op import arm_attention_through_op

from support.arm_cases import ARM_PARAMS, make_arm, make_inputs, make_mask

NHEAD, HEAD_DIM, DC = 2, 8, 4


@pytest.mark.parametrize("training, dropout_p", [(False, 0.0), (True, 0.2)])
def test_op_matches_entry(training, dropout_p):
    b, t, h, w = 2, 3, 3, 4
    mask = make_mask(b, h, w)
    inputs, (grad_out, grad_attn) = make_inputs(b, NHEAD, HEAD_DIM, t, h, w)
    results = []
    for call in (arm_attention, arm_attention_through_op):
        arm = make_arm(NHEAD, DC, "both", training)
        tensors = [x.clone().requires_grad_() for x in inputs]
        out, attn = call(*tensors[:3], mask, h, w, tensors[3], ARMWeights.from_module(arm), bn_training=training,
                         dropout_p=dropout_p, seed=7, backend="triton")
        params = [arm.get_parameter(name) for name in ARM_PARAMS]
        grads = torch.autograd.grad((out * grad_out).sum() + (attn * grad_attn).sum(), tensors + params)
        bn = arm.post_norm.bn
        results.append((out, attn, bn.running_mean, bn.running_var, bn.num_batches_tracked, *grads))
    names = ["out", "attn", "running_mean", "running_var", "num_batches_tracked", "q", "k", "v", "prev_attn", *ARM_PARAMS]
    for name, got, want in zip(names, results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)


def test_cross_attention_step_op_matches_entry():
    """torch.ops.fastcomer.cross_attention_step on the Triton backend: the entry's outputs and
    in-place coverage update (the op's declared mutation)."""
    from fastcomer.ops.cross_attention_step import cross_attention_step

    from support.cross_attention_step_cases import clone, make_step

    step = make_step(2, "both")
    direct = clone(step)
    want, want_returned = cross_attention_step(**direct, backend="triton")
    arm = step["arm"]
    got, got_returned = torch.ops.fastcomer.cross_attention_step(
        step["q"], step["k"], step["v"], step["key_padding_mask"], step["image_index"], step["height"], *arm[:4],
        arm.coverage.value, step["coverage"], step["prev_attn"], "triton", None, False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_returned, want_returned, rtol=0, atol=0)
    torch.testing.assert_close(step["coverage"], direct["coverage"], rtol=0, atol=0)
