"""The fused decode step as one Triton kernel: one program per row (beam).

Pass 1 walks the row's L positions in tiles: S = q.K for all heads, the ARM refinement R of
the coverage image (5x5 conv as 25 shifted [tile, C] x [C, dc] products, ReLU, mask, folded
projection), online softmax statistics of S and of S - R, and the online sum A'V. It parks
S - R in `returned` and, when it updates the self coverage, S in a scratch buffer. Pass 2,
after a barrier (the conv of a neighbouring tile reads the coverage that pass 2 writes),
normalises S - R into A' (what the layer returns), and adds this step to the layer's own
coverage sums: A to the self block, prev_attn (the previous layer's A') to the cross block.
"""
from typing import Tuple

import triton
import triton.language as tl
import torch
from torch import Tensor

from ...model.arm import CONV_PADDING, CONV_TAPS, KERNEL_SIZE, FoldedARM
from .interface import DecodeStepShape, PreparedARMWeights, plan

# tl.dot needs every dimension >= 16 on GPUs (the conv's channels are padded to it).
MIN_DOT = 16
# The conv's geometry as compile-time constants of the kernel.
TAPS = tl.constexpr(CONV_TAPS)
KSIZE = tl.constexpr(KERNEL_SIZE)
PAD = tl.constexpr(CONV_PADDING)
# Finite start of the running maxima: exp(-inf - start) = 0 for masked tiles, no inf - inf.
NEG_START = tl.constexpr(-1.0e30)


@triton.jit
def _decode_step_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, image_index_ptr,
    coverage_ptr, prev_attn_ptr, conv_weight_ptr, conv_bias_ptr, proj_weight_ptr, shift_ptr,
    scratch_ptr, returned_ptr, out_ptr,
    L, height, width, nhead, head_dim, channels,
    stride_q_row, stride_q_head,
    stride_k_image, stride_k_head, stride_k_pos,
    stride_v_image, stride_v_head, stride_v_pos,
    stride_mask_image, stride_coverage_row,
    REFINE: tl.constexpr, UPDATE_CROSS: tl.constexpr, UPDATE_SELF: tl.constexpr,
    DC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    image = tl.load(image_index_ptr + row).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    head_ok = heads < nhead
    out_ptrs = out_ptr + row * nhead * head_dim + heads[:, None] * head_dim + dims[None, :]
    out_ok = head_ok[:, None] & (dims[None, :] < head_dim)
    returned_row = returned_ptr + row * nhead * L  # A' [nhead, L]; S - R until pass 2
    if image < 0:  # inactive row: output and returned attention 0, coverage untouched
        tl.store(out_ptrs, tl.zeros((BLOCK_H, BLOCK_D), tl.float32).to(out_ptr.dtype.element_ty), mask=out_ok)
        for start in range(0, L, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            tl.store(returned_row + heads[None, :] * L + pos[:, None], tl.zeros((BLOCK_L, BLOCK_H), tl.float32),
                     mask=(pos < L)[:, None] & head_ok[None, :])
    else:
        q = tl.load(q_ptr + row * stride_q_row + heads[:, None] * stride_q_head + dims[None, :], mask=out_ok, other=0.0)
        q = q.to(tl.float32)
        kv_offsets = heads[None, :, None] * stride_k_head + dims[None, None, :]
        v_offsets = heads[None, :, None] * stride_v_head + dims[None, None, :]
        kv_ok = head_ok[None, :, None] & (dims[None, None, :] < head_dim)
        k_row = k_ptr + image * stride_k_image
        v_row = v_ptr + image * stride_v_image
        coverage_row = coverage_ptr + row * stride_coverage_row
        scores_row = scratch_ptr + row * nhead * L  # S [nhead, L], kept for the self-coverage update
        chans = tl.arange(0, BLOCK_C)
        dcs = tl.arange(0, DC)
        if REFINE:
            conv_bias = tl.load(conv_bias_ptr + dcs).to(tl.float32)
            proj_t = tl.load(proj_weight_ptr + heads[None, :] * DC + dcs[:, None], mask=head_ok[None, :], other=0.0)
            proj_t = proj_t.to(tl.float32)  # [DC, BLOCK_H]
            shift = tl.load(shift_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)

        max_s = tl.full((BLOCK_H,), NEG_START, tl.float32)
        sum_s = tl.zeros((BLOCK_H,), tl.float32)
        max_t = tl.full((BLOCK_H,), NEG_START, tl.float32)
        sum_t = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
        for start in range(0, L, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            in_range = pos < L
            padded = tl.load(mask_ptr + image * stride_mask_image + pos, mask=in_range, other=1) != 0
            keep = (~padded)[:, None] & head_ok[None, :]  # [BLOCK_L, BLOCK_H]
            k = tl.load(k_row + pos[:, None, None] * stride_k_pos + kv_offsets, mask=in_range[:, None, None] & kv_ok, other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :, :], axis=2)
            s = tl.where(keep, s, float("-inf"))
            if REFINE:
                y_pos = pos // width
                x_pos = pos % width
                conv = tl.zeros((BLOCK_L, DC), tl.float32)
                for tap in range(TAPS):
                    ys = y_pos + (tap // KSIZE - PAD)
                    xs = x_pos + (tap - tap // KSIZE * KSIZE - PAD)  # tap % KSIZE (no constexpr __rmod__)
                    inside = in_range & (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
                    patch = tl.load(coverage_row + chans[None, :] * L + (ys * width + xs)[:, None],
                                    mask=inside[:, None] & (chans[None, :] < channels), other=0.0)
                    weight = tl.load(conv_weight_ptr + dcs[None, :] * (channels * TAPS) + chans[:, None] * TAPS + tap,
                                     mask=chans[:, None] < channels, other=0.0)
                    conv = tl.dot(patch.to(tl.float32), weight.to(tl.float32), conv, input_precision="ieee")
                hidden = tl.where(padded[:, None], 0.0, tl.maximum(conv + conv_bias[None, :], 0.0))
                # the projection is ~1/50 of the conv's work: a broadcast sum spares padding heads to 16
                r = tl.sum(hidden[:, :, None] * proj_t[None, :, :], axis=1) + shift[None, :]
                t = tl.where(keep, s - r, float("-inf"))
            else:
                t = s
            new_max_s = tl.maximum(max_s, tl.max(s, axis=0))
            sum_s = sum_s * tl.exp(max_s - new_max_s) + tl.sum(tl.exp(s - new_max_s[None, :]), axis=0)
            max_s = new_max_s
            new_max_t = tl.maximum(max_t, tl.max(t, axis=0))
            rescale = tl.exp(max_t - new_max_t)
            p = tl.exp(t - new_max_t[None, :])
            sum_t = sum_t * rescale + tl.sum(p, axis=0)
            max_t = new_max_t
            v = tl.load(v_row + pos[:, None, None] * stride_v_pos + v_offsets, mask=in_range[:, None, None] & kv_ok, other=0.0)
            acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32), axis=0)
            block_offsets = heads[None, :] * L + pos[:, None]
            store_ok = in_range[:, None] & head_ok[None, :]
            tl.store(returned_row + block_offsets, t, mask=store_ok)
            if UPDATE_SELF:
                tl.store(scores_row + block_offsets, s, mask=store_ok)
        # padding heads (>= nhead) have empty sums: 1 keeps their discarded lanes finite
        sum_s = tl.where(head_ok, sum_s, 1.0)
        sum_t = tl.where(head_ok, sum_t, 1.0)
        tl.store(out_ptrs, (acc / sum_t[:, None]).to(out_ptr.dtype.element_ty), mask=out_ok)

        # every conv read of the coverage precedes its update; every S - R store precedes its read
        tl.debug_barrier()
        for start in range(0, L, BLOCK_L):
            pos = start + tl.arange(0, BLOCK_L)
            store_ok = (pos < L)[:, None] & head_ok[None, :]
            block_offsets = heads[None, :] * L + pos[:, None]
            refined = tl.exp(tl.load(returned_row + block_offsets, mask=store_ok, other=float("-inf")) - max_t[None, :])
            tl.store(returned_row + block_offsets, refined / sum_t[None, :], mask=store_ok)
            if UPDATE_CROSS:
                prev = tl.load(prev_attn_ptr + row * nhead * L + block_offsets, mask=store_ok, other=0.0)
                old = tl.load(coverage_row + block_offsets, mask=store_ok, other=0.0)
                tl.store(coverage_row + block_offsets, (old.to(tl.float32) + prev.to(tl.float32)).to(old.dtype),
                         mask=store_ok)
            if UPDATE_SELF:
                attn = tl.exp(tl.load(scores_row + block_offsets, mask=store_ok, other=float("-inf")) - max_s[None, :])
                self_ptrs = coverage_row + (channels - nhead) * L + block_offsets
                old = tl.load(self_ptrs, mask=store_ok, other=0.0)
                tl.store(self_ptrs, (old.to(tl.float32) + attn / sum_s[None, :]).to(old.dtype), mask=store_ok)


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(n))


def _zero_padded(t: Tensor, dim: int, size: int) -> Tensor:
    """A new contiguous copy of t, extended with zeros along dim to size."""
    padded = t.new_zeros(t.shape[:dim] + (size,) + t.shape[dim + 1:])
    padded.narrow(dim, 0, t.shape[dim]).copy_(t)
    return padded


def _dot_ready(arm: FoldedARM) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ARM's weights as the kernel reads them. The conv's output channels are the operand of
    tl.dot: a power of two >= 16; zero filters with zero bias and zero projection columns add
    nothing to R."""
    dc = _pow2_at_least(arm.conv_weight.shape[0], MIN_DOT)
    return (_zero_padded(arm.conv_weight, 0, dc), _zero_padded(arm.conv_bias, 0, dc),
            _zero_padded(arm.proj_weight, 1, dc), arm.shift.clone(memory_format=torch.contiguous_format))


_dot_ready_weights = PreparedARMWeights(_dot_ready)


def triton_step(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn,
                shape: DecodeStepShape, block_l: int = 32, num_warps: int = 8) -> Tuple[Tensor, Tensor]:
    """Launches the kernel on inputs `check_inputs` accepted (CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1); returns (out, returned)."""
    if q.stride(2) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("triton decode step: q, k and v need a unit stride on head_dim")
    if key_padding_mask.stride(1) != 1:
        raise ValueError("triton decode step: key_padding_mask needs a unit stride along L")
    flags = plan(arm, coverage)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    returned = torch.empty((shape.rows, shape.nhead, shape.length), device=q.device, dtype=torch.float32)
    scratch = torch.empty((shape.rows, shape.nhead, shape.length) if flags.update_self else (1,),
                          device=q.device, dtype=torch.float32)
    dummy = returned  # stands for the tensors a mode does not read; the constexpr flags keep it untouched
    conv_weight, conv_bias, proj_weight, shift = _dot_ready_weights(arm) if flags.refine else (dummy,) * 4
    if shape.rows == 0:
        return out, returned
    _decode_step_kernel[(shape.rows,)](
        q, k, v, key_padding_mask.view(torch.uint8), image_index,
        coverage if flags.refine else dummy, prev_attn.contiguous() if flags.update_cross else dummy,
        conv_weight, conv_bias, proj_weight, shift, scratch, returned, out,
        shape.length, shape.height, shape.width, shape.nhead, shape.head_dim, shape.channels,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        key_padding_mask.stride(0), coverage.stride(0) if flags.refine else 0,
        REFINE=flags.refine, UPDATE_CROSS=flags.update_cross, UPDATE_SELF=flags.update_self,
        DC=conv_weight.shape[0] if flags.refine else MIN_DOT, BLOCK_L=block_l,
        BLOCK_H=_pow2_at_least(shape.nhead, 1), BLOCK_D=_pow2_at_least(shape.head_dim, 1),
        BLOCK_C=_pow2_at_least(max(shape.channels, 1), MIN_DOT),
        num_warps=num_warps,
    )
    return out, returned
