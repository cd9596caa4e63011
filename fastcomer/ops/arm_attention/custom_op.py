"""`arm_attention` as torch.library custom ops, so that torch.compile and torch.export see
the fused training op as one node (`torch.ops.fastcomer.arm_attention`) with a fake
implementation (shapes only, no kernel run) and a registered autograd formula.

The ops wrap the public entry `fastcomer.ops.arm_attention.arm_attention` (the Triton
kernels and their autograd Function), with the ARM's weights flattened into tensors and
scalars, as an op schema needs. The backward op recomputes the entry's forward with autograd
and differentiates it (running statistics untouched), so it depends on nothing but the
entry; eager calls of `arm_attention_op` skip the op and its recomputation. torch.library.triton_op would let inductor see the kernels themselves, but it needs
every launch inside the launchers written as `wrap_triton(kernel)[grid](...)`.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ...model.arm import CoverageMode
from ..registry import OPS
from ..tracing import is_tracing
from . import arm_attention
from .inputs import ARMWeights, check_inputs, float32_precisions

# The differentiable inputs, in the order of the backward op's gradients.
_GRAD_INPUTS = ("q", "k", "v", "prev_attn", "conv_weight", "conv_bias", "proj_weight", "bn_weight", "bn_bias")


def _weights(conv_weight, conv_bias, proj_weight, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
             momentum, eps, coverage) -> Optional[ARMWeights]:
    if conv_weight is None:
        return None
    return ARMWeights(conv_weight, conv_bias, proj_weight, bn_weight, bn_bias, running_mean, running_var,
                      num_batches_tracked, momentum, eps, CoverageMode(coverage))


@torch.library.custom_op(OPS["arm_attention"].custom_op, mutates_args=())
def _arm_attention_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, height: int, width: int, prev_attn: Optional[Tensor],
    conv_weight: Optional[Tensor], conv_bias: Optional[Tensor], proj_weight: Optional[Tensor],
    bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
    running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
    coverage: str, bn_training: bool, dropout_p: float, seed: Tensor, precision: str, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, attn, running_mean, running_var, num_batches_tracked after this call; the last
    three empty when the call does not update them). Functional, as an op with an autograd
    formula must be: the statistics are updated on copies, which the caller writes back."""
    updated = [_updated_copy(t, bn_training) for t in (running_mean, running_var, num_batches_tracked)]
    arm = _weights(conv_weight, conv_bias, proj_weight, bn_weight, bn_bias, *updated, momentum, eps, coverage)
    with torch.no_grad():
        out, attn = arm_attention(q, k, v, key_padding_mask, height, width, prev_attn, arm, bn_training=bn_training,
                                  dropout_p=dropout_p, seed=int(seed), precision=precision or None, backend=backend)
    return (out, attn, *(q.new_empty(0) if t is None or not bn_training else t for t in updated))


def _updated_copy(statistic: Optional[Tensor], bn_training: bool) -> Optional[Tensor]:
    return statistic.clone() if statistic is not None and bn_training else statistic


@_arm_attention_op.register_fake
def _(q, k, v, key_padding_mask, height, width, prev_attn, conv_weight, conv_bias, proj_weight, bn_weight, bn_bias,
      running_mean, running_var, num_batches_tracked, momentum, eps, coverage, bn_training, *options):
    statistics = [q.new_empty(0) if t is None or not bn_training else torch.empty_like(t)
                  for t in (running_mean, running_var, num_batches_tracked)]
    return (torch.empty_like(q), q.new_empty((q.shape[0], q.shape[1], k.shape[1])), *statistics)


@torch.library.custom_op(OPS["arm_attention"].custom_op + "_backward", mutates_args=())
def _arm_attention_backward_op(
    grad_out: Tensor, grad_attn: Tensor, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, height: int,
    width: int, prev_attn: Optional[Tensor], conv_weight: Optional[Tensor], conv_bias: Optional[Tensor],
    proj_weight: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: Optional[float], eps: float,
    coverage: str, bn_training: bool, dropout_p: float, seed: Tensor, precision: str, backend: str,
) -> List[Tensor]:
    """Gradients of _GRAD_INPUTS (an empty tensor for one that is None)."""
    inputs = [None if t is None else t.detach().requires_grad_()
              for t in (q, k, v, prev_attn, conv_weight, conv_bias, proj_weight, bn_weight, bn_bias)]
    q_, k_, v_, prev_, *params = inputs
    if bn_training and conv_weight is not None:  # statistics the recomputation may update, then drops
        running_mean, running_var = torch.zeros_like(bn_weight), torch.ones_like(bn_weight)
    arm = _weights(*params, running_mean, running_var, None, momentum, eps, coverage)
    with torch.enable_grad():
        out, attn = arm_attention(q_, k_, v_, key_padding_mask, height, width, prev_, arm, bn_training=bn_training,
                                  dropout_p=dropout_p, seed=int(seed), precision=precision or None, backend=backend)
        wanted = [t for t in inputs if t is not None]
        grads = iter(torch.autograd.grad((out, attn), wanted, (grad_out, grad_attn), allow_unused=True))
    result = []
    for t in inputs:
        grad = None if t is None else next(grads)
        result.append(grad if grad is not None else (q.new_empty(0) if t is None else torch.zeros_like(t)))
    return result


@_arm_attention_backward_op.register_fake
def _(grad_out, grad_attn, q, k, v, key_padding_mask, height, width, prev_attn, conv_weight, conv_bias, proj_weight,
      bn_weight, bn_bias, *rest):
    return [q.new_empty(0) if t is None else torch.empty_like(t)
            for t in (q, k, v, prev_attn, conv_weight, conv_bias, proj_weight, bn_weight, bn_bias)]


def _setup_context(ctx, inputs, output):
    (q, k, v, key_padding_mask, height, width, prev_attn, conv_weight, conv_bias, proj_weight, bn_weight, bn_bias,
     running_mean, running_var, _, momentum, eps, coverage, bn_training, dropout_p, seed, precision, backend) = inputs
    # in training the running statistics are only updated (written back after this op), never read
    statistics = (None, None) if bn_training else (running_mean, running_var)
    ctx.save_for_backward(q, k, v, key_padding_mask, prev_attn, conv_weight, conv_bias, proj_weight, bn_weight,
                          bn_bias, *statistics, seed)
    ctx.options = (height, width, momentum, eps, coverage, bn_training, dropout_p, precision, backend)


def _backward(ctx, grad_out, grad_attn, *statistics_grads):
    (q, k, v, key_padding_mask, prev_attn, conv_weight, conv_bias, proj_weight, bn_weight, bn_bias, running_mean,
     running_var, seed) = ctx.saved_tensors
    height, width, momentum, eps, coverage, bn_training, dropout_p, precision, backend = ctx.options
    grads = torch.ops.fastcomer.arm_attention_backward(
        grad_out, grad_attn, q, k, v, key_padding_mask, height, width, prev_attn, conv_weight, conv_bias, proj_weight,
        bn_weight, bn_bias, running_mean, running_var, momentum, eps, coverage, bn_training, dropout_p, seed, precision,
        backend,
    )
    by_name = {name: (g if present is not None else None)
               for name, g, present in zip(_GRAD_INPUTS, grads, (q, k, v, prev_attn, conv_weight, conv_bias,
                                                                 proj_weight, bn_weight, bn_bias))}
    return (by_name["q"], by_name["k"], by_name["v"], None, None, None, by_name["prev_attn"], by_name["conv_weight"],
            by_name["conv_bias"], by_name["proj_weight"], by_name["bn_weight"], by_name["bn_bias"],
            None, None, None, None, None, None, None, None, None, None, None)


_arm_attention_op.register_autograd(_backward, setup_context=_setup_context)


def arm_attention_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, height: int, width: int,
    prev_attn: Optional[Tensor] = None, arm: Optional[ARMWeights] = None, *, bn_training: bool = False,
    dropout_p: float = 0.0, seed: Optional[int] = None, precision: Optional[str] = None, backend: str = "triton",
) -> Tuple[Tensor, Tensor]:
    """`fastcomer.ops.arm_attention.arm_attention` for a resolved backend (same arguments, same
    results; the drop-in modules resolve once per call and pass theirs); traced (by
    torch.compile, torch.export or on fake tensors) through the custom op
    `torch.ops.fastcomer.arm_attention`, one node, with the dropout seed drawn as a tensor (no
    host sync, no graph break). Eager calls run the entry itself, whose autograd Function
    saves what its backward needs instead of recomputing the forward as the op's backward does."""
    if not is_tracing(q):
        return arm_attention(q, k, v, key_padding_mask, height, width, prev_attn, arm, bn_training=bn_training,
                             dropout_p=dropout_p, seed=seed, precision=precision, backend=backend)
    return arm_attention_through_op(q, k, v, key_padding_mask, height, width, prev_attn, arm, bn_training=bn_training,
                                    dropout_p=dropout_p, seed=seed, precision=precision, backend=backend)


def arm_attention_through_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, height: int, width: int,
    prev_attn: Optional[Tensor] = None, arm: Optional[ARMWeights] = None, *, bn_training: bool = False,
    dropout_p: float = 0.0, seed: Optional[int] = None, precision: Optional[str] = None, backend: str = "triton",
) -> Tuple[Tensor, Tensor]:
    """`arm_attention` through the custom op, eager or traced (what `arm_attention_op` runs
    when tracing); running statistics written back to the ARM's buffers after the op."""
    check_inputs(q, k, v, key_padding_mask, height, width, prev_attn, arm, float32_precisions(q, precision)[0])
    seed_tensor = (torch.randint(0, 2**31 - 1, (), dtype=torch.int64) if seed is None and dropout_p > 0
                   else torch.tensor(seed or 0, dtype=torch.int64))
    if arm is None:
        weights = (None,) * 8 + (None, 0.0, CoverageMode.CROSS.value)
    else:
        weights = (*arm[:8], arm.momentum, float(arm.eps), arm.coverage.value)
    out, attn, *statistics = torch.ops.fastcomer.arm_attention(q, k, v, key_padding_mask, height, width, prev_attn,
                                                               *weights, bn_training, dropout_p, seed_tensor,
                                                               precision or "",  # "": eager's float32 policy, read when run
                                                               backend)
    if arm is not None and bn_training:
        with torch.no_grad():
            for buffer, updated in zip((arm.running_mean, arm.running_var, arm.num_batches_tracked), statistics):
                if buffer is not None:
                    buffer.copy_(updated)
    return out, attn
