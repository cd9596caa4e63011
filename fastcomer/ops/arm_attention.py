"""Fused cross-attention with CoMER's Attention Refinement Module (SPEC section 2).

`arm_attention(q, k, v, key_padding_mask, height, width, prev_attn, arm, ...)` returns
the attention output before out_proj [B*H, T, D] and the attention the layer returns,
[B*H, T, L] (the refined one A' after dropout, or the plain one without ARM), which is
the next layer's `prev_attn`. The coverage (running sum over target steps) is built
inside the conv kernel from the per-step attentions themselves, so `prev_attn` is the
previous layer's returned attention, as CoMER passes it.

Forward, in Triton (see arm_attention_kernels.py):
  1. unrefined attention A = dropout(softmax(S)) [B*H, T, L], float32 (only when the
     ARM covers this layer's own attention: self or both coverage);
  2. Z = proj(mask(relu(conv5x5(coverage) + bias))) [B*H, T, L], float32, plus the
     BatchNorm partial sums in training;
  3. R = BatchNorm(Z) as a per-head affine map (batch statistics in training, running
     ones in eval; the running statistics are updated as nn.BatchNorm1d does), then
     A' = dropout(softmax(S - R)), written, and A'.V.
Backward: recomputes the layer with the plain path (fastcomer.model: masked_softmax and
the AttentionRefinementModule via torch.func.functional_call, in float32, replaying
the forward's dropout masks) and differentiates it with autograd. It is exact but not
fused: it materialises the coverage image. Fused backward kernels are not written yet.
"""
from functools import lru_cache
from typing import NamedTuple, Optional, Tuple

import torch
import triton
from torch import Tensor

from ..model.arm import AttentionRefinementModule
from ..model.attention import masked_softmax
from .arm_attention_kernels import attention_rows_kernel, coverage_projection_kernel, dropout_keep_kernel

COVERAGE_MODES = ("cross", "self", "both")
PRECISIONS = ("ieee", "tf32")


class ARMWeights(NamedTuple):
    """The ARM's parameters and BatchNorm state, as tensors (shared, not copied)."""

    conv_weight: Tensor  # [dc, C, 5, 5], C = nhead per coverage kind (cross first)
    conv_bias: Tensor  # [dc]
    proj_weight: Tensor  # [nhead, dc, 1, 1]
    bn_weight: Tensor  # [nhead]
    bn_bias: Tensor  # [nhead]
    running_mean: Tensor  # [nhead], updated in place in training
    running_var: Tensor  # [nhead], updated in place in training
    num_batches_tracked: Optional[Tensor]  # scalar long, incremented in training
    momentum: Optional[float]  # None: cumulative average, as nn.BatchNorm1d
    eps: float
    coverage: str  # 'cross', 'self' or 'both'

    @classmethod
    def from_module(cls, arm) -> "ARMWeights":
        """From an AttentionRefinementModule (fastcomer's or the public CoMER code's)."""
        bn = arm.post_norm.bn
        coverage = {(True, False): "cross", (False, True): "self", (True, True): "both"}[
            (bool(arm.cross_coverage), bool(arm.self_coverage))
        ]
        return cls(arm.conv.weight, arm.conv.bias, arm.proj.weight, bn.weight, bn.bias, bn.running_mean,
                   bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps, coverage)


def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, height: int, width: int,
           prev_attn: Optional[Tensor], arm: Optional[ARMWeights], precision: str) -> int:
    """Validate shapes, dtypes and devices; returns the number of heads."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q [B*H, T, D], k and v [B*H, L, D] expected, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == key_padding_mask.device):
        raise ValueError("q, k, v and key_padding_mask must be on one device")
    if key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2:
        raise ValueError(f"key_padding_mask must be bool [B, L], got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    b, L = key_padding_mask.shape
    if height * width != L or k.shape[1] != L:
        raise ValueError(f"height*width = {height}*{width} must equal L = {L} (k has {k.shape[1]} keys)")
    if q.shape[0] % b:
        raise ValueError(f"q has {q.shape[0]} rows, not a multiple of the batch {b}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    nhead = q.shape[0] // b
    if arm is not None:
        if arm.coverage not in COVERAGE_MODES:
            raise ValueError(f"coverage must be one of {COVERAGE_MODES}, got {arm.coverage!r}")
        cin = nhead * (2 if arm.coverage == "both" else 1)
        if arm.conv_weight.shape[1:] != (cin, 5, 5) or arm.proj_weight.shape[:2] != (nhead, arm.conv_weight.shape[0]):
            raise ValueError(f"ARM weights do not fit {nhead} heads with coverage {arm.coverage!r}")
        if arm.coverage != "self" and (prev_attn is None or prev_attn.shape != (q.shape[0], q.shape[1], L)):
            raise ValueError(f"coverage {arm.coverage!r} needs prev_attn [B*H, T, L] = {(q.shape[0], q.shape[1], L)}")
    return nhead


def _blocks(D: int, L: int) -> dict:
    return dict(BLOCK_T=16, BLOCK_L=max(16, min(64, triton.next_power_of_2(L))), BLOCK_D=max(16, triton.next_power_of_2(D)))


def _attention_rows(q, k, v, mask_u8, nhead, z, scale, shift, out, attn, seed, rng_offset, p_drop, precision):
    BH, T, D = q.shape
    L = k.shape[1]
    blocks = _blocks(D, L)
    grid = (BH, triton.cdiv(T, blocks["BLOCK_T"]))
    has_r = z is not None
    dummy = attn  # never read when the matching constexpr flag is off
    attention_rows_kernel[grid](
        q, k, v, z if has_r else dummy, scale if has_r else dummy, shift if has_r else dummy, mask_u8,
        out if out is not None else dummy, attn,
        T, L, D, nhead, seed, rng_offset, p_drop,
        HAS_R=has_r, WRITE_OUT=out is not None, DROPOUT=p_drop > 0, PRECISION=precision, **blocks,
    )


def _coverage_projection(prev, curr, mask_u8, nhead, height, width, arm: ARMWeights, stats: bool, precision):
    """Z [B*H, T, L] float32 and, with stats, per-head (sum, sum of squares) of Z over unmasked positions."""
    b, L = mask_u8.shape
    T = (prev if prev is not None else curr).shape[1]
    dc, cin = arm.conv_weight.shape[:2]
    block_l = max(16, min(64, triton.next_power_of_2(L)))
    block_h = max(16, triton.next_power_of_2(nhead))
    tiles = triton.cdiv(L, block_l)
    z = torch.empty(b * nhead, T, L, device=mask_u8.device, dtype=torch.float32)
    partial = torch.empty(b, tiles, 2, block_h, device=mask_u8.device, dtype=torch.float32) if stats else z
    coverage_projection_kernel[(b, tiles)](
        prev if prev is not None else curr, curr if curr is not None else prev, mask_u8,
        arm.conv_weight.float().contiguous(), arm.conv_bias.float().contiguous(),
        arm.proj_weight.float().reshape(nhead, dc).contiguous(), z, partial,
        T, L, width, height, nhead, dc, cin, nhead if prev is not None else 0,
        STATS=stats, PRECISION=precision,
        BLOCK_L=block_l, BLOCK_C=max(16, triton.next_power_of_2(cin)), BLOCK_DC=max(16, triton.next_power_of_2(dc)),
        BLOCK_H=block_h,
    )
    if not stats:
        return z, None
    return z, partial.double().sum((0, 1))[:, :nhead]


def _batchnorm_affine(arm: ARMWeights, sums: Optional[Tensor], count: int) -> Tuple[Tensor, Tensor]:
    """R = scale*Z + shift per head. With sums (training): batch statistics, and the
    running statistics updated exactly as nn.BatchNorm1d updates them."""
    if sums is None:
        mean, var = arm.running_mean.double(), arm.running_var.double()
    else:
        if count < 2:
            raise ValueError("BatchNorm in training needs more than one unmasked position")
        mean = sums[0] / count
        var = (sums[1] / count - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            if arm.num_batches_tracked is not None:
                arm.num_batches_tracked.add_(1)
            momentum = arm.momentum
            if momentum is None:
                momentum = 1.0 / float(arm.num_batches_tracked.item())
            arm.running_mean.mul_(1 - momentum).add_((momentum * mean).to(arm.running_mean.dtype))
            unbiased = var * count / (count - 1)
            arm.running_var.mul_(1 - momentum).add_((momentum * unbiased).to(arm.running_var.dtype))
    scale = arm.bn_weight.double() * torch.rsqrt(var + arm.eps)
    shift = arm.bn_bias.double() - mean * scale
    return scale.float().contiguous(), shift.float().contiguous()


def _dropout_keep(shape, device, seed, rng_offset, p_drop):
    BH, T, L = shape
    keep = torch.empty(shape, dtype=torch.int8, device=device)
    grid = (BH, triton.cdiv(T, 16), triton.cdiv(L, 64))
    dropout_keep_kernel[grid](keep, BH, T, L, seed, rng_offset, p_drop, BLOCK_T=16, BLOCK_L=64)
    return keep.bool()


@lru_cache(maxsize=None)
def _arm_template(nhead: int, dc: int, coverage: str) -> AttentionRefinementModule:
    """A parameter-less stand-in of the ARM's structure for functional_call in the backward."""
    with torch.device("meta"):
        return AttentionRefinementModule(nhead, dc, coverage != "self", coverage != "cross")


def _reference(q, k, v, key_padding_mask, height, prev_attn, conv_weight, conv_bias, proj_weight, bn_weight, bn_bias,
               arm: Optional[ARMWeights], bn_batch_stats: bool, keep_a, keep_refined, p_drop):
    """The plain path (fastcomer.model) of the layer, used by the backward."""
    nhead = q.shape[0] // key_padding_mask.shape[0]
    scores = torch.bmm(q, k.transpose(1, 2))
    attn = masked_softmax(scores, key_padding_mask, None, nhead)
    if keep_a is not None:
        attn = attn * keep_a / (1 - p_drop)
    if arm is not None:
        template = _arm_template(nhead, conv_weight.shape[0], arm.coverage).train(bn_batch_stats)
        state = {
            "conv.weight": conv_weight, "conv.bias": conv_bias, "proj.weight": proj_weight,
            "post_norm.bn.weight": bn_weight, "post_norm.bn.bias": bn_bias,
            # copies: the forward already updated the real running statistics
            "post_norm.bn.running_mean": arm.running_mean.detach().float().clone(),
            "post_norm.bn.running_var": arm.running_var.detach().float().clone(),
            "post_norm.bn.num_batches_tracked": torch.zeros((), dtype=torch.long, device=q.device),
        }
        prev = prev_attn if prev_attn is not None else attn
        r = torch.func.functional_call(template, state, (prev, key_padding_mask, height, attn))
        attn = masked_softmax(scores - r, key_padding_mask, None, nhead)
        if keep_refined is not None:
            attn = attn * keep_refined / (1 - p_drop)
    return torch.bmm(attn, v), attn


class ARMAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, height, width, prev_attn, conv_weight, conv_bias, proj_weight,
                bn_weight, bn_bias, arm, bn_training, p_drop, seed, precision):
        nhead = q.shape[0] // key_padding_mask.shape[0]
        BH, T, D = q.shape
        L = k.shape[1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        mask_u8 = key_padding_mask.to(torch.uint8).contiguous()
        out = torch.empty_like(q)
        attn = torch.empty(BH, T, L, device=q.device, dtype=q.dtype)
        if arm is None:
            _attention_rows(q, k, v, mask_u8, nhead, None, None, None, out, attn, seed, 0, p_drop, precision)
        else:
            curr = None
            if arm.coverage != "cross":
                curr = torch.empty(BH, T, L, device=q.device, dtype=torch.float32)
                _attention_rows(q, k, v, mask_u8, nhead, None, None, None, None, curr, seed, 0, p_drop, precision)
            prev = prev_attn.contiguous() if arm.coverage != "self" else None
            z, sums = _coverage_projection(prev, curr, mask_u8, nhead, height, width, arm, bn_training, precision)
            count = int((~key_padding_mask).sum().item()) * T
            scale, shift = _batchnorm_affine(arm, sums, count)
            _attention_rows(q, k, v, mask_u8, nhead, z, scale, shift, out, attn, seed, BH * T * L, p_drop, precision)
        ctx.save_for_backward(q, k, v, key_padding_mask, prev_attn, conv_weight, conv_bias, proj_weight, bn_weight, bn_bias)
        ctx.config = (height, arm, bn_training, p_drop, seed)
        return out, attn

    @staticmethod
    def backward(ctx, grad_out, grad_attn):
        q, k, v, key_padding_mask, prev_attn, *weights = ctx.saved_tensors
        height, arm, bn_training, p_drop, seed = ctx.config
        keep_a = keep_refined = None
        if p_drop > 0:
            shape = (q.shape[0], q.shape[1], k.shape[1])
            keep_a = _dropout_keep(shape, q.device, seed, 0, p_drop)
            if arm is not None:
                keep_refined = _dropout_keep(shape, q.device, seed, shape[0] * shape[1] * shape[2], p_drop)
        inputs = [q, k, v, prev_attn, *weights]
        wanted = [i for i, x in enumerate(inputs) if x is not None and ctx.needs_input_grad[(0, 1, 2, 6, 7, 8, 9, 10, 11)[i]]]
        with torch.enable_grad():
            leaves = [x.detach().float().requires_grad_(i in wanted) if x is not None else None for i, x in enumerate(inputs)]
            fq, fk, fv, fprev, *fweights = leaves
            out, attn = _reference(fq, fk, fv, key_padding_mask, height, fprev, *fweights, arm, bn_training,
                                   keep_a, keep_refined, p_drop)
            grads = torch.autograd.grad(
                (out, attn), [leaves[i] for i in wanted],
                (grad_out.float(), grad_attn.float() if grad_attn is not None else torch.zeros_like(attn)),
                allow_unused=True,
            )
        result = [None] * len(inputs)
        for i, g in zip(wanted, grads):
            result[i] = None if g is None else g.to(inputs[i].dtype)
        gq, gk, gv, gprev, gconv_w, gconv_b, gproj, gbn_w, gbn_b = result
        return gq, gk, gv, None, None, None, gprev, gconv_w, gconv_b, gproj, gbn_w, gbn_b, None, None, None, None, None


def arm_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    height: int,
    width: int,
    prev_attn: Optional[Tensor] = None,
    arm: Optional[ARMWeights] = None,
    *,
    bn_training: bool = False,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    precision: str = "ieee",
) -> Tuple[Tensor, Tensor]:
    """Cross-attention of CoMER's decoder layer, with the ARM refinement when `arm` is given.

    q [B*H, T, D] (already scaled by D^-0.5), k, v [B*H, L, D], key_padding_mask [B, L]
    bool (True = padding), L = height*width row-major; prev_attn [B*H, T, L]: the
    attention the previous layer returned (needed for 'cross' and 'both' coverage).
    bn_training: BatchNorm on batch statistics (and running statistics updated in place).
    dropout_p > 0 applies attention dropout (pass it only in training); seed picks the
    random stream (drawn from torch's generator when None); forward and backward agree.
    precision: 'ieee' (exact float32 products) or 'tf32' (float32 inputs only).
    Returns out [B*H, T, D] (before out_proj) and the returned attention [B*H, T, L].
    """
    _check(q, k, v, key_padding_mask, height, width, prev_attn, arm, precision)
    if q.dtype == torch.float64:
        raise ValueError("arm_attention runs float32, float16 and bfloat16; float64 takes the plain path")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (), device="cpu").item()) if dropout_p > 0 else 0
    if arm is None:
        weights = (None,) * 5
    else:
        weights = (arm.conv_weight, arm.conv_bias, arm.proj_weight, arm.bn_weight, arm.bn_bias)
    prev = prev_attn if arm is not None and arm.coverage != "self" else None
    return ARMAttentionFunction.apply(q, k, v, key_padding_mask, height, width, prev, *weights, arm, bn_training,
                                      float(dropout_p), seed, precision)

