"""The fused ARM attention in Triton: the launchers and the autograd Function.

Forward (kernels in triton_kernels.py):
  1. unrefined attention A = dropout(softmax(S)) [B*H, T, L], float32 (only when the
     ARM covers this layer's own attention: self or both coverage);
  2. Z = proj(mask(relu(conv5x5(coverage) + bias))) [B*H, T, L], float32, plus the
     BatchNorm partial sums in training;
  3. R = BatchNorm(Z) as a per-head affine map (batch statistics in training, running
     ones in eval; the running statistics are updated as nn.BatchNorm1d does), then
     A' = dropout(softmax(S - R)), written, and A'.V; the row logsumexp is saved.
Backward, in Triton (see `_attention_backward` for the passes): flash-style row passes
over query tiles recompute softmax(S - R) from the logsumexp and dA' = dO.V^T per tile
(never stored), write the refined score gradient dS [B*H, T, L] float32 (-dR, which the
ARM backward reads at neighbouring positions, so it is kept) and dq; BatchNorm's backward
is per-head arithmetic in PyTorch (vectors of length nhead) that turns dS into dZ as an
affine map applied inside `arm_backward_kernel` (d prev_attn, d unrefined attention,
bias and projection gradients; `arm_weight_grad_kernel` the conv weight's, without the coverage image, the conv output or dZ
in memory; it reads Z's ReLU pattern, one int32 of bits per position, that the forward
wrote); with self coverage a second row pass adds the unrefined softmax's term to dS and
dq; a pass over key tiles gives dk = dS^T.q and dv = A'^T.dO. Dropout masks are replayed
from the same counter-based RNG. The ARM needs dc <= 32 (CoMER's is 32).
"""
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from ...backends import triton_interpreter
from ...model.arm import CONV_TAPS, KERNEL_SIZE
from .interface import ARMWeights
from .triton_kernels import (arm_backward_kernel, arm_weight_grad_kernel, attention_backward_keys_kernel,
                             attention_backward_rows_kernel, attention_rows_kernel, coverage_projection_kernel,
                             unrefined_backward_rows_kernel)

# Warps per program of the row passes (a tile of 16 queries against tiles of 64 keys): with 4,
# the float32 backward row pass and the TF32 refined forward spill (see `python -m fastcomer
# kernels`); the key pass keeps Triton's default of 4.
ROW_NUM_WARPS = 8


def attention_blocks(D: int, L: int) -> dict:
    """Tile sizes of the attention row and key passes (also what the static report compiles)."""
    return dict(BLOCK_T=16, BLOCK_L=max(16, min(64, triton.next_power_of_2(L))), BLOCK_D=max(16, triton.next_power_of_2(D)))


def _attention_rows(q, k, v, mask_u8, nhead, z, scale, shift, out, attn, seed, rng_offset, p_drop, precision,
                    lse=None):
    BH, T, D = q.shape
    L = k.shape[1]
    blocks = attention_blocks(D, L)
    grid = (BH, triton.cdiv(T, blocks["BLOCK_T"]))
    has_r = z is not None
    dummy = attn  # never read when the matching constexpr flag is off
    attention_rows_kernel[grid](
        q, k, v, z if has_r else dummy, scale if has_r else dummy, shift if has_r else dummy, mask_u8,
        out if out is not None else dummy, attn, lse if lse is not None else dummy,
        T, L, D, nhead, seed, rng_offset, p_drop,
        HAS_R=has_r, WRITE_OUT=out is not None, WRITE_LSE=lse is not None,
        DROPOUT=p_drop > 0, PRECISION=precision, num_warps=ROW_NUM_WARPS, **blocks,
    )


# Warps per program of the ARM kernels: their [dc, tile] float32 accumulators and the
# tap loop's operands fit in 255 registers per thread over 8 warps, not over 4 (spills;
# see `python -m fastcomer kernels`).
ARM_NUM_WARPS = 8


def arm_blocks(nhead: int, dc: int, cin: int, L: int) -> dict:
    """Tile sizes of the ARM conv/projection kernels (also what the static report compiles)."""
    # Triton's interpreter pays per operation, not per element: wider tiles, fewer programs.
    widest = 128 if triton_interpreter() else 64
    return dict(BLOCK_L=max(16, min(widest, triton.next_power_of_2(L))), BLOCK_C=max(16, triton.next_power_of_2(cin)),
                BLOCK_DC=max(16, triton.next_power_of_2(dc)), BLOCK_H=max(16, triton.next_power_of_2(nhead)))


def arm_dot_precision(dtype: torch.dtype, precision: str) -> str:
    """The ARM kernels' PRECISION: half inputs run their convs and projection on operands of
    their own type ('bf16', 'fp16'; float32 accumulation), float32 ones in `precision`."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, precision)


def _coverage_projection(prev, curr, mask_u8, nhead, height, width, arm: ARMWeights, stats: bool, relu_bits: bool,
                         precision):
    """Z [B*H, T, L] float32; with stats, per-head (sum, sum of squares) of Z over unmasked
    positions; with relu_bits, the ReLU's on/off pattern [B, T, L] (bit c = conv channel c,
    masked positions off) that the backward needs."""
    b, L = mask_u8.shape
    T = (prev if prev is not None else curr).shape[1]
    dc, cin = arm.conv_weight.shape[:2]
    blocks = arm_blocks(nhead, dc, cin, L)
    tiles = triton.cdiv(L, blocks["BLOCK_L"])
    z = torch.empty(b * nhead, T, L, device=mask_u8.device, dtype=torch.float32)
    partial = torch.empty(b, tiles, 2, blocks["BLOCK_H"], device=z.device, dtype=torch.float32) if stats else z
    relu = torch.empty(b, T, L, device=z.device, dtype=torch.int32) if relu_bits else z
    coverage_projection_kernel[(b, tiles)](
        prev if prev is not None else curr, curr if curr is not None else prev, mask_u8,
        arm.conv_weight.float().contiguous(), arm.conv_bias.float().contiguous(),
        arm.proj_weight.float().reshape(nhead, dc).contiguous(), z, partial, relu,
        T, L, width, height, nhead, dc, cin, nhead if prev is not None else 0,
        STATS=stats, WRITE_RELU=relu_bits, PRECISION=precision, num_warps=ARM_NUM_WARPS, **blocks,
    )
    sums = partial.double().sum((0, 1))[:, :nhead] if stats else None
    return z, sums, (relu if relu_bits else None)


def _unmasked_count(key_padding_mask: Tensor, steps: int) -> Tensor:
    """Positions BatchNorm normalises over, as a device tensor (no host sync)."""
    return (~key_padding_mask).sum() * steps


def _batchnorm_statistics(arm: ARMWeights, sums: Optional[Tensor], count: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, var) per head, float64: of the batch with sums (training; the running statistics
    are then updated exactly as nn.BatchNorm1d updates them), else the running ones. Everything
    stays on the device: no host sync (CUDA graphs, torch.compile)."""
    if sums is None:
        return arm.running_mean.double(), arm.running_var.double()
    torch._assert_async(count >= 2, "BatchNorm in training needs more than one unmasked position")
    count = count.double()
    mean = sums[0] / count
    var = (sums[1] / count - mean * mean).clamp_min(0.0)
    with torch.no_grad():
        if arm.num_batches_tracked is not None:
            arm.num_batches_tracked.add_(1)
        momentum = arm.momentum
        if momentum is None:  # cumulative average: 1 / batches seen, on the device
            momentum = 1.0 / arm.num_batches_tracked.double()
        arm.running_mean.mul_(1 - momentum).add_((momentum * mean).to(arm.running_mean.dtype))
        unbiased = var * count / (count - 1)
        arm.running_var.mul_(1 - momentum).add_((momentum * unbiased).to(arm.running_var.dtype))
    return mean, var


class ARMAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, height, width, prev_attn, conv_weight, conv_bias, proj_weight,
                bn_weight, bn_bias, arm, bn_training, p_drop, seed, precision, conv_precision):
        ctx.set_materialize_grads(False)  # an unused returned attention: no dAttn pass in the backward
        nhead = q.shape[0] // key_padding_mask.shape[0]
        BH, T, D = q.shape
        L = k.shape[1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        mask_u8 = key_padding_mask.to(torch.uint8).contiguous()
        out = torch.empty_like(q)
        attn = torch.empty(BH, T, L, device=q.device, dtype=q.dtype)
        z = relu = mean = var = scale = shift = None
        lse = torch.empty(BH, T, device=q.device, dtype=torch.float32) if any(ctx.needs_input_grad) else None
        if arm is None:
            _attention_rows(q, k, v, mask_u8, nhead, None, None, None, out, attn, seed, 0, p_drop, precision, lse)
        else:
            curr = None
            if arm.coverage.uses_self:
                curr = torch.empty(BH, T, L, device=q.device, dtype=torch.float32)
                _attention_rows(q, k, v, mask_u8, nhead, None, None, None, None, curr, seed, 0, p_drop, precision)
            prev = prev_attn.contiguous() if arm.coverage.uses_cross else None
            z, sums, relu = _coverage_projection(prev, curr, mask_u8, nhead, height, width, arm, bn_training,
                                                 any(ctx.needs_input_grad), arm_dot_precision(q.dtype, conv_precision))
            mean, var = _batchnorm_statistics(arm, sums, _unmasked_count(key_padding_mask, T))
            scale = arm.bn_weight.double() * torch.rsqrt(var + arm.eps)
            shift = (arm.bn_bias.double() - mean * scale).float().contiguous()
            scale = scale.float().contiguous()
            _attention_rows(q, k, v, mask_u8, nhead, z, scale, shift, out, attn, seed, BH * T * L, p_drop, precision,
                            lse)
            prev_attn = prev
        ctx.save_for_backward(q, k, v, key_padding_mask, prev_attn, conv_weight, conv_bias, proj_weight, bn_weight,
                              z, relu, mean, var, scale, shift, attn, lse)
        ctx.config = (height, width, arm, bn_training, p_drop, seed, precision, conv_precision)
        return out, attn

    @staticmethod
    def backward(ctx, grad_out, grad_attn):
        """Flash-style Triton passes over the attention around the ARM backward kernel (see
        `_attention_backward`); only per-head vectors and [B*H, T, D] casts in PyTorch."""
        (q, k, v, key_padding_mask, prev, conv_weight, conv_bias, proj_weight, bn_weight, z, relu, mean, var, scale,
         shift, attn, lse) = ctx.saved_tensors
        height, width, arm, bn_training, p_drop, seed, precision, conv_precision = ctx.config
        grads = _attention_backward(q, k, v, key_padding_mask, height, width, prev, z, relu, mean, var, scale, shift,
                                    attn, lse, grad_out, grad_attn, arm, conv_weight, conv_bias, proj_weight,
                                    bn_weight, bn_training, p_drop, seed, precision, conv_precision)
        grad_q, grad_k, grad_v, grad_prev, grad_conv_w, grad_conv_b, grad_proj, grad_bn_weight, grad_bn_bias = grads
        cast = lambda g, like: None if g is None or like is None else g.to(like.dtype)
        return (grad_q.to(q.dtype), grad_k, grad_v, None, None, None, cast(grad_prev, prev),
                cast(grad_conv_w, conv_weight), cast(grad_conv_b, conv_bias), cast(grad_proj, proj_weight),
                cast(grad_bn_weight, bn_weight), cast(grad_bn_bias, bn_weight), None, None, None, None, None, None)


def _attention_backward(q, k, v, key_padding_mask, height, width, prev, z, relu, mean, var, scale, shift, attn,
                        lse, grad_out, grad_attn, arm, conv_weight, conv_bias, proj_weight, bn_weight, bn_training,
                        p_drop, seed, precision, conv_precision):
    """The backward, in passes (S = q.k^T, P' = softmax(S - R), A' = dropout(P') returned,
    P = softmax(S), A = dropout(P) the unrefined attention the self coverage reads):

    1. `attention_backward_rows_kernel` over query tiles: P' recomputed from the forward's
       logsumexp (and renormalised by its row sum), dA' = dO.V^T + dAttn per tile; a first
       sweep gives delta = rowsum(P' * dropout(dA')), the second writes
       dS' = P' * (dropout(dA') - delta)
       (float32 [B*H, T, L]; dR = -dS' is what the ARM backward needs, at neighbouring
       positions too, so this one attention-sized gradient is materialised), dq = dS'.K and
       per-program sums (sum dS', sum dS'*(Z - mean)) for BatchNorm.
    2. BatchNorm backward on per-head vectors in PyTorch: the weight and bias gradients and
       the per-head affine map dZ = a dS' + b (Z - mean) + c (b, c: through the batch statistics,
       training only).
    3. With self coverage, A and its logsumexp recomputed by the forward's first kernel.
    4. `arm_backward_kernel`: d prev_attn, dA, bias and projection gradients (dZ applied
       on the fly from dS' and Z); `arm_weight_grad_kernel`: the conv weight's, one reduction per tap.
    5. With self coverage, `unrefined_backward_rows_kernel`: dS_A = P * (dropout(dA) - delta_A)
       added to dS' in place and dS_A.K to dq.
    6. `attention_backward_keys_kernel` over key tiles: dk = dS^T.q, dv = A'^T.dO.
    Dropout masks are replayed from the counter-based RNG (never stored).
    """
    b, L = key_padding_mask.shape
    BH, T, D = q.shape
    nhead = BH // b
    device = q.device
    mask_u8 = key_padding_mask.to(torch.uint8).contiguous()
    blocks = attention_blocks(D, L)
    t_tiles = triton.cdiv(T, blocks["BLOCK_T"])
    grad_out = torch.zeros_like(q) if grad_out is None else grad_out.to(q.dtype).contiguous()
    has_dattn = grad_attn is not None
    grad_attn = grad_attn.contiguous() if has_dattn else attn
    has_r = arm is not None
    dummy = lse
    ds = torch.empty(BH, T, L, device=device, dtype=torch.float32)
    dq = torch.empty(BH, T, D, device=device, dtype=torch.float32)
    stats = torch.empty(BH, t_tiles, 2, device=device, dtype=torch.float32) if has_r else dummy
    mean_f = mean.float().contiguous() if has_r else dummy
    attention_backward_rows_kernel[(BH, t_tiles)](
        q, k, v, z if has_r else dummy, scale if has_r else dummy, shift if has_r else dummy, mean_f, mask_u8, grad_out,
        grad_attn, lse, ds, dq, stats,
        T, L, D, nhead, seed, BH * T * L if has_r else 0, p_drop,
        HAS_R=has_r, HAS_DATTN=has_dattn, DROPOUT=p_drop > 0, PRECISION=precision, num_warps=ROW_NUM_WARPS,
        **blocks,
    )
    grad_prev = None
    grads_arm = (None,) * 5
    if has_r:
        # BatchNorm: R = gamma * xhat + beta at unmasked keys, xhat = (Z - mean) * rstd, dR = -dS'.
        sums = stats.double().view(b, nhead, t_tiles, 2).sum((0, 2))
        count = _unmasked_count(key_padding_mask, T).double()
        rstd = torch.rsqrt(var + arm.eps)
        grad_bn_bias = -sums[:, 0]
        grad_bn_weight = -rstd * sums[:, 1]
        gamma_rstd = bn_weight.double() * rstd
        coef_a = -gamma_rstd
        coef_b = torch.zeros_like(coef_a)
        coef_c = torch.zeros_like(coef_a)
        if bn_training:  # dZ = gamma rstd (dR - sum dR / count - xhat sum(dR xhat) / count)
            coef_b = -gamma_rstd * rstd * grad_bn_weight / count
            coef_c = -gamma_rstd * grad_bn_bias / count
        coef_dz = torch.stack([coef_a, coef_b, mean, coef_c]).float().contiguous()
        lse_a = curr = None
        if arm.coverage.uses_self:  # the unrefined attention, as the forward's first kernel wrote it
            curr = torch.empty(BH, T, L, device=device, dtype=torch.float32)
            lse_a = torch.empty(BH, T, device=device, dtype=torch.float32)
            _attention_rows(q, k, v, mask_u8, nhead, None, None, None, None, curr, seed, 0, p_drop, precision, lse_a)
        grad_prev, grad_curr, grad_conv_w, grad_conv_b, grad_proj = _arm_backward(
            prev, curr, mask_u8, height, width, ds, z, coef_dz, relu, arm, conv_weight, conv_bias, proj_weight,
            arm_dot_precision(q.dtype, conv_precision))
        del curr
        grads_arm = (grad_conv_w, grad_conv_b, grad_proj, grad_bn_weight, grad_bn_bias)
        if grad_curr is not None:
            unrefined_backward_rows_kernel[(BH, t_tiles)](
                q, k, mask_u8, grad_curr, lse_a, ds, dq, T, L, D, nhead, seed, p_drop,
                DROPOUT=p_drop > 0, PRECISION=precision, num_warps=ROW_NUM_WARPS, **blocks,
            )
            del grad_curr
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    attention_backward_keys_kernel[(BH, triton.cdiv(L, blocks["BLOCK_L"]))](
        q, grad_out, attn, ds, dk, dv, T, L, D, PRECISION=precision, **blocks,
    )
    return (dq, dk, dv, grad_prev) + tuple(grads_arm)


def _arm_backward(prev, curr, mask_u8, height, width, ds, z, coef_dz, relu, arm, conv_weight, conv_bias,
                  proj_weight, precision):
    """Gradients of Z = proj(mask(relu(conv(coverage) + bias))) through `arm_backward_kernel`
    and `arm_weight_grad_kernel`,
    with dZ = a dS + b (Z - mean) + c per head (coef_dz [4, H]: a, b, mean, c): (d prev_attn, d unrefined attention,
    d conv.weight, d conv.bias, d proj.weight)."""
    b, L = mask_u8.shape
    BH, T, _ = ds.shape
    nhead = BH // b
    dc, cin = conv_weight.shape[:2]
    blocks = arm_blocks(nhead, dc, cin, L)
    tiles = triton.cdiv(L, blocks["BLOCK_L"])
    programs = b * tiles
    device = ds.device
    grad_prev = torch.zeros(BH, T, L, device=device) if prev is not None else None
    grad_curr = torch.zeros(BH, T, L, device=device) if curr is not None else None
    part_w = torch.empty(programs, CONV_TAPS, blocks["BLOCK_DC"], blocks["BLOCK_C"], device=device)
    part_b = torch.empty(programs, blocks["BLOCK_DC"], device=device)
    part_proj = torch.empty(programs, blocks["BLOCK_H"], blocks["BLOCK_DC"], device=device)
    first = prev if prev is not None else curr
    second = curr if curr is not None else first
    proj_w = proj_weight.float().reshape(nhead, dc).contiguous()
    sizes = (T, L, width, height, nhead, dc, cin, nhead if prev is not None else 0)
    arm_backward_kernel[(b, tiles)](
        first, second, mask_u8, conv_weight.float().contiguous(), conv_bias.float().contiguous(), proj_w,
        ds, z, coef_dz, relu, grad_prev if grad_prev is not None else grad_curr,
        grad_curr if grad_curr is not None else grad_prev, part_b, part_proj, *sizes,
        PRECISION=precision, num_warps=ARM_NUM_WARPS, **blocks,
    )
    arm_weight_grad_kernel[(CONV_TAPS, b, tiles)](
        first, second, mask_u8, proj_w, ds, z, coef_dz, relu, part_w, *sizes, PRECISION=precision,
        num_warps=ARM_NUM_WARPS, **blocks,
    )
    grad_conv_w = part_w.sum(0)[:, :dc, :cin].permute(1, 2, 0).reshape(dc, cin, KERNEL_SIZE, KERNEL_SIZE)
    grad_conv_b = part_b.sum(0)[:dc]
    grad_proj = part_proj.sum(0)[:nhead, :dc].reshape(nhead, dc, 1, 1)
    return grad_prev, grad_curr, grad_conv_w, grad_conv_b, grad_proj




def triton_arm_attention(q, k, v, key_padding_mask, height, width, prev_attn, arm, bn_training, dropout_p, seed,
                         precision, conv_precision) -> Tuple[Tensor, Tensor]:
    """`fastcomer.ops.arm_attention` on checked inputs."""
    weights = (None,) * 5 if arm is None else (arm.conv_weight, arm.conv_bias, arm.proj_weight, arm.bn_weight,
                                              arm.bn_bias)
    prev = prev_attn if arm is not None and arm.coverage.uses_cross else None
    return ARMAttentionFunction.apply(q, k, v, key_padding_mask, height, width, prev, *weights, arm, bn_training,
                                      float(dropout_p), seed, precision, conv_precision)
