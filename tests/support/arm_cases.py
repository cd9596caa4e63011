"""Cases shared by the interpreter tests and the CUDA tests of fastcomer.ops.arm_attention:
the op against the plain path (fastcomer.model) run in float64. Importing this module does
not import triton (the caller decides TRITON_INTERPRET first)."""
import copy
from functools import partial

import torch

from support.tolerances import accumulation_dtype, allowance, max_error, scale_of

from fastcomer.model.arm import AttentionRefinementModule
from fastcomer.model.attention import masked_softmax


def make_mask(b, h, w, device="cpu"):
    """Image 0 unpadded; the others padded at the bottom and on the right."""
    mask = torch.zeros(b, h, w, dtype=torch.bool, device=device)
    mask[1:, h - 1 :, :] = True
    mask[1:, :, w - 2 :] = True
    return mask.view(b, h * w)


def make_arm(nhead, dc, coverage, training, seed=0):
    torch.manual_seed(seed)
    arm = AttentionRefinementModule(nhead, dc, coverage != "self", coverage != "cross")
    with torch.no_grad():  # running statistics and affine parameters away from identity, so they matter
        bn = arm.post_norm.bn
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
        arm.proj.weight.mul_(3.0)
    return arm.train(training)


def make_inputs(b, nhead, head_dim, t, h, w, seed=1):
    """q (scaled), k, v, the previous layer's attention and upstream gradients, float32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    L = h * w
    q = torch.randn(b * nhead, t, head_dim, generator=g) * head_dim**-0.25
    k = torch.randn(b * nhead, L, head_dim, generator=g) * head_dim**-0.25
    v = torch.randn(b * nhead, L, head_dim, generator=g)
    prev = torch.softmax(2 * torch.randn(b * nhead, t, L, generator=g), -1)
    grads = torch.randn(b * nhead, t, head_dim, generator=g), torch.randn(b * nhead, t, L, generator=g)
    return (q, k, v, prev), grads


def plain_layer(q, k, v, mask, height, prev, arm, nhead):
    """CoMER's cross-attention, as fastcomer.model.attention.MultiheadAttention computes it."""
    scores = torch.bmm(q, k.transpose(1, 2))
    attn = masked_softmax(scores, mask, None, nhead)
    if arm is not None:
        attn = masked_softmax(scores - arm(prev, mask, height, attn), mask, None, nhead)
    return torch.bmm(attn, v), attn


def grads_of(outputs, upstream, tensors):
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outputs, upstream))
    return torch.autograd.grad(loss, tensors, allow_unused=True)


ARM_PARAMS = ["conv.weight", "conv.bias", "proj.weight", "post_norm.bn.weight", "post_norm.bn.bias"]


def check_close(name, got, want, plain_low, rtol, zero_residue=16, terms_scale=0.0):
    """|got - want| <= allowance(scale of want, rtol, float32 accumulation, terms_scale, the plain
    low-precision path's own error, residue): the fused op may be as far from float64 as rtol,
    as the plain path in got's dtype is, or (terms_scale given) as rounding the summed terms allows."""
    err, scale, plain_err = max_error(got, want), scale_of(want), max_error(plain_low, want)
    # A value that vanishes in exact arithmetic (T = 1: constant conv output, rows of the softmax
    # gradient summing to 0) is pure rounding residue in both paths: zero_residue x, not 4x.
    residue = zero_residue if scale < 1e-12 else 4
    allowed = allowance(scale, rtol, accumulation_dtype(got.dtype), terms_scale, plain_err, residue)
    assert err <= allowed, f"{name}: error {err:.3e} > {allowed:.3e} (scale {scale:.3e}, plain error {plain_err:.3e})"


def record_refinement(arm):
    """Keeps the ARM's last output R as arm.last_refinement: every ARM parameter's gradient is a
    sum of terms each carrying dL/dR at one position, so |dL/dR| summed is their scale (the
    floor of check_close where the gradient itself vanishes)."""
    arm.register_forward_hook(lambda module, args, out: setattr(module, "last_refinement", out))
    return arm


def check_gradients(outputs, ref, low, upstream, fused_in, ref_in, low_in, arms, rtol, zero_residue=16):
    """Gradients of q, k, v, prev_attn and every ARM parameter: fused against float64, with the
    plain path in the fused inputs' dtype as the yardstick (check_close). arms: (fused, float64, low)."""
    params = lambda m: [m.get_parameter(n) for n in ARM_PARAMS]
    got = grads_of(outputs, upstream, fused_in + params(arms[0]))
    *want, grad_r = grads_of(ref, upstream, ref_in + params(arms[1]) + [arms[1].last_refinement])
    plain_low = grads_of(low, upstream, low_in + params(arms[2]))
    arm_terms = grad_r.abs().sum().item()
    for name, g, r, p in zip(["q", "k", "v", "prev_attn"] + ARM_PARAMS, got, want, plain_low):
        if r is None:  # prev_attn does not reach R with self coverage only
            assert g is None or not g.any(), name
            continue
        # ARM parameter gradients are sums over every (b, t, l) with cancellation, accumulated in float32
        # per tile in another order (conv.bias at L = 153: 9e-5 of its scale, the plain float32 path 1.5e-5)
        if name in ARM_PARAMS:
            check_close(f"gradient of {name}", g, r, p, 10 * rtol, zero_residue, terms_scale=arm_terms)
        else:
            check_close(f"gradient of {name}", g, r, p, rtol, zero_residue)


def check_layer(b, t, h, w, coverage, training, nhead, head_dim, dc, rtol, device="cpu", dtype=torch.float32,
                precision="ieee"):
    """Forward, returned attention, BatchNorm running statistics and the gradients of every
    input and ARM parameter, against the plain path in float64. Each error may be up to
    rtol of the tensor's scale (10 rtol for the ARM parameters' gradients), or 4x the plain path's own error in `dtype` (some ARM
    gradients are sums with heavy cancellation, the BatchNorm bias's exactly zero; 16x where the
    whole reference gradient is zero to float64 rounding, i.e. both paths give only noise)."""
    from fastcomer.ops.arm_attention import ARMWeights, arm_attention

    mask = make_mask(b, h, w, device)
    inputs, upstream = make_inputs(b, nhead, head_dim, t, h, w)
    upstream = [u.to(device) for u in upstream]
    arm = make_arm(nhead, dc, coverage, training)
    arm64, arm_low = record_refinement(copy.deepcopy(arm).double().to(device)), copy.deepcopy(arm).to(device, dtype)
    arm = arm.to(device, dtype)
    fused_in = [x.to(device, dtype).requires_grad_() for x in inputs]
    ref_in = [x.to(device, torch.float64).requires_grad_() for x in inputs]
    low_in = [x.to(device, dtype).requires_grad_() for x in inputs]

    out, attn = arm_attention(*fused_in[:3], mask, h, w, fused_in[3], ARMWeights.from_module(arm),
                              bn_training=training, precision=precision, backend="triton")
    ref = plain_layer(*ref_in[:3], mask, h, ref_in[3], arm64, nhead)
    low = plain_layer(*low_in[:3], mask, h, low_in[3], arm_low, nhead)
    assert out.dtype == attn.dtype == dtype

    check = partial(check_close, rtol=rtol)
    for name, got, want, plain_low in zip(["output", "returned attention"], (out, attn), ref, low):
        check(name, got, want, plain_low)

    bn, bn64, bn_low = arm.post_norm.bn, arm64.post_norm.bn, arm_low.post_norm.bn
    assert int(bn.num_batches_tracked) == int(bn64.num_batches_tracked) == int(training)
    check("running_mean", bn.running_mean, bn64.running_mean, bn_low.running_mean)
    check("running_var", bn.running_var, bn64.running_var, bn_low.running_var)

    check_gradients((out, attn), ref, low, upstream, fused_in, ref_in, low_in, (arm, arm64, arm_low), rtol)
