"""The fused cross-attention step as three Triton kernels that split L across programs (flash-decoding),
so that one image's call fills the GPU:

1. `_refinement_kernel`, one program per (row, tile of L), refining layers only: the ARM's
   refinement R of the row's coverage image, the 5x5 conv as an implicit GEMM on tensor cores
   (K = taps x channels: one [tile, C] x [C, dc] dot per tap into one accumulator), ReLU,
   zero at padding, folded projection (a [tile, dc] x [dc, heads] dot). R is parked in
   `returned`.
2. `_partial_attention_kernel`, one program per (slot, head, split of L): the rows of a slot
   (the beams that read one image) share each K/V tile, read once per image: S = Q K^T and
   the split's P V are tensor-core dots over the slot's rows. The split's softmax statistics
   (max and sum of exp, of S and of S - R) go to `stats`, its unnormalised A'V to `partial`,
   S - R to `returned`, and S to `scratch` when the self coverage is updated.
3. `_merge_kernel`, one program per (row, tile of L): merges the splits' statistics,
   normalises S - R into A' (what the layer returns), adds this step to the layer's coverage
   sums (A to the self block, prev_attn to the cross block), and in tile 0 merges the
   partial A'V into the output.

The conv of kernel 1 reads the coverage across tile borders (its 5x5 halo) and kernel 3
updates it: being two launches apart, no tile's conv can see another tile's update.
"""
from typing import NamedTuple, Optional, Tuple

import triton
import triton.language as tl
import torch
from torch import Tensor

from ...model.arm import CONV_PADDING, CONV_TAPS, KERNEL_SIZE, FoldedARM
from ..triton_launch import launch_kernel
from .inputs import CoverageFlags, CrossAttentionStepShape, coverage_flags
from .launch import MIN_DOT, LaunchPlan, PreparedARMWeights, launch_plan

# The conv's geometry as compile-time constants of the kernel.
TAPS = tl.constexpr(CONV_TAPS)
KSIZE = tl.constexpr(KERNEL_SIZE)
PAD = tl.constexpr(CONV_PADDING)
# Finite start of the running maxima: exp(-inf - start) = 0 for masked tiles, no inf - inf.
NEG_START = tl.constexpr(-1.0e30)
# float32 dot operands on tensor cores at float32 accuracy: three TF32 products (hi*hi,
# hi*lo, lo*hi) instead of one, whose 10-bit mantissa would miss the reference's tolerance.
FLOAT32_DOT = "tf32x3"
# Fields of one split's statistics in `stats`.
STATS = 4  # max of S, sum of exp(S - max), max of S - R, sum of exp(S - R - max)
@triton.jit
def _refinement_kernel(
    mask_ptr, image_index_ptr, coverage_ptr, conv_weight_ptr, conv_bias_ptr, proj_weight_ptr, shift_ptr,
    refinement_ptr,
    L, height, width, nhead, channels, stride_mask_image, stride_coverage_row,
    DC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    image = tl.load(image_index_ptr + row).to(tl.int64)
    if image >= 0:  # inactive rows: the merge writes their zeros
        pos = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        in_range = pos < L
        heads = tl.arange(0, BLOCK_H)
        head_ok = heads < nhead
        chans = tl.arange(0, BLOCK_C)
        dcs = tl.arange(0, DC)
        coverage_row = coverage_ptr + row * stride_coverage_row
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
            conv = tl.dot(patch.to(tl.float32), weight.to(tl.float32), conv, input_precision=DOT_PRECISION)
        padded = tl.load(mask_ptr + image * stride_mask_image + pos, mask=in_range, other=1) != 0
        hidden = tl.where(padded[:, None], 0.0, tl.maximum(conv + tl.load(conv_bias_ptr + dcs)[None, :], 0.0))
        # the folded projection as a dot too (heads padded to 16): a broadcast product would hold
        # BLOCK_L x DC x heads values in registers
        proj_t = tl.load(proj_weight_ptr + heads[None, :] * DC + dcs[:, None], mask=head_ok[None, :], other=0.0)
        shift = tl.load(shift_ptr + heads, mask=head_ok, other=0.0)
        r = tl.dot(hidden, proj_t, input_precision=DOT_PRECISION) + shift[None, :]
        tl.store(refinement_ptr + row * nhead * L + heads[None, :] * L + pos[:, None], r,
                 mask=in_range[:, None] & head_ok[None, :])


@triton.jit
def _partial_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, image_index_ptr, scratch_ptr, returned_ptr, stats_ptr, partial_ptr,
    rows, L, nhead, head_dim, rows_per_slot, splits,
    stride_q_row, stride_q_head,
    stride_k_image, stride_k_head, stride_k_pos,
    stride_v_image, stride_v_head, stride_v_pos,
    stride_mask_image,
    REFINE: tl.constexpr, UPDATE_SELF: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    slot = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    split = tl.program_id(2)
    members = tl.arange(0, BLOCK_G)
    row = slot * rows_per_slot + members
    member_ok = (members < rows_per_slot) & (row < rows)
    index = tl.load(image_index_ptr + row, mask=member_ok, other=-1).to(tl.int64)
    # a slot's active rows all read one image (the launcher's contract), its inactive ones -1
    image = tl.max(index, axis=0)
    if image >= 0:
        active = index >= 0
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < head_dim
        pos = split * BLOCK_L + tl.arange(0, BLOCK_L)
        in_range = pos < L
        q = tl.load(q_ptr + row[:, None] * stride_q_row + head * stride_q_head + dims[None, :],
                    mask=active[:, None] & dim_ok[None, :], other=0.0)
        k_t = tl.load(k_ptr + image * stride_k_image + head * stride_k_head + pos[None, :] * stride_k_pos + dims[:, None],
                      mask=dim_ok[:, None] & in_range[None, :], other=0.0)
        # float32 operands take DOT_PRECISION; half ones multiply exactly into float32 sums
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)  # [BLOCK_G, BLOCK_L]
        padded = tl.load(mask_ptr + image * stride_mask_image + pos, mask=in_range, other=1) != 0
        keep = active[:, None] & (~padded)[None, :]
        s = tl.where(keep, s, float("-inf"))
        offsets = row[:, None] * nhead * L + head * L + pos[None, :]
        store_ok = active[:, None] & in_range[None, :]
        if REFINE:
            t = tl.where(keep, s - tl.load(returned_ptr + offsets, mask=store_ok, other=0.0), float("-inf"))
        else:
            t = s
        max_s = tl.maximum(tl.max(s, axis=1), NEG_START)
        sum_s = tl.sum(tl.exp(s - max_s[:, None]), axis=1)
        max_t = tl.maximum(tl.max(t, axis=1), NEG_START)
        p = tl.exp(t - max_t[:, None])
        sum_t = tl.sum(p, axis=1)
        v = tl.load(v_ptr + image * stride_v_image + head * stride_v_head + pos[:, None] * stride_v_pos + dims[None, :],
                    mask=in_range[:, None] & dim_ok[None, :], other=0.0)
        acc = tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)  # [BLOCK_G, BLOCK_D]
        tl.store(returned_ptr + offsets, t, mask=store_ok)
        if UPDATE_SELF:
            tl.store(scratch_ptr + offsets, s, mask=store_ok)
        split_index = (row * nhead + head) * splits + split
        stats = stats_ptr + split_index * 4
        tl.store(stats, max_s, mask=active)
        tl.store(stats + 1, sum_s, mask=active)
        tl.store(stats + 2, max_t, mask=active)
        tl.store(stats + 3, sum_t, mask=active)
        tl.store(partial_ptr + split_index[:, None] * head_dim + dims[None, :], acc, mask=active[:, None] & dim_ok[None, :])


@triton.jit
def _merge_kernel(
    image_index_ptr, coverage_ptr, prev_attn_ptr, scratch_ptr, returned_ptr, stats_ptr, partial_ptr, out_ptr,
    L, nhead, head_dim, channels, splits, stride_coverage_row,
    UPDATE_CROSS: tl.constexpr, UPDATE_SELF: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    image = tl.load(image_index_ptr + row)
    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < nhead
    dims = tl.arange(0, BLOCK_D)
    out_ptrs = out_ptr + row * nhead * head_dim + heads[:, None] * head_dim + dims[None, :]
    out_ok = head_ok[:, None] & (dims[None, :] < head_dim)
    pos = tile * BLOCK_L + tl.arange(0, BLOCK_L)
    offsets = heads[:, None] * L + pos[None, :]  # [BLOCK_H, BLOCK_L] within a row
    tile_ok = head_ok[:, None] & (pos < L)[None, :]
    returned_row = returned_ptr + row * nhead * L
    if image < 0:  # inactive row: output and returned attention 0, coverage untouched
        tl.store(returned_row + offsets, tl.zeros((BLOCK_H, BLOCK_L), tl.float32), mask=tile_ok)
        if tile == 0:
            tl.store(out_ptrs, tl.zeros((BLOCK_H, BLOCK_D), tl.float32).to(out_ptr.dtype.element_ty), mask=out_ok)
    else:
        split_ids = tl.arange(0, BLOCK_S)
        split_index = (row * nhead + heads[:, None]) * splits + split_ids[None, :]  # [BLOCK_H, BLOCK_S]
        split_ok = head_ok[:, None] & (split_ids < splits)[None, :]
        stats = stats_ptr + split_index * 4
        max_t = tl.load(stats + 2, mask=split_ok, other=NEG_START)
        total_max_t = tl.max(max_t, axis=1)
        weight_t = tl.where(split_ok, tl.exp(max_t - total_max_t[:, None]), 0.0)  # of each split's sums
        sum_t = tl.sum(tl.load(stats + 3, mask=split_ok, other=0.0) * weight_t, axis=1)
        sum_t = tl.where(head_ok, sum_t, 1.0)  # padding heads: finite discarded lanes
        refined = tl.exp(tl.load(returned_row + offsets, mask=tile_ok, other=float("-inf")) - total_max_t[:, None])
        tl.store(returned_row + offsets, refined / sum_t[:, None], mask=tile_ok)
        coverage_row = coverage_ptr + row * stride_coverage_row
        if UPDATE_CROSS:
            prev = tl.load(prev_attn_ptr + row * nhead * L + offsets, mask=tile_ok, other=0.0)
            old = tl.load(coverage_row + offsets, mask=tile_ok, other=0.0)
            tl.store(coverage_row + offsets, (old.to(tl.float32) + prev.to(tl.float32)).to(old.dtype), mask=tile_ok)
        if UPDATE_SELF:
            max_s = tl.load(stats, mask=split_ok, other=NEG_START)
            total_max_s = tl.max(max_s, axis=1)
            sum_s = tl.sum(tl.load(stats + 1, mask=split_ok, other=0.0) * tl.exp(max_s - total_max_s[:, None]), axis=1)
            sum_s = tl.where(head_ok, sum_s, 1.0)
            attn = tl.exp(tl.load(scratch_ptr + row * nhead * L + offsets, mask=tile_ok, other=float("-inf"))
                          - total_max_s[:, None])
            self_ptrs = coverage_row + (channels - nhead) * L + offsets
            old = tl.load(self_ptrs, mask=tile_ok, other=0.0)
            tl.store(self_ptrs, (old.to(tl.float32) + attn / sum_s[:, None]).to(old.dtype), mask=tile_ok)
        if tile == 0:
            partial = tl.load(partial_ptr + split_index[:, :, None] * head_dim + dims[None, None, :],
                              mask=split_ok[:, :, None] & (dims < head_dim)[None, None, :], other=0.0)
            acc = tl.sum(partial * weight_t[:, :, None], axis=1)  # [BLOCK_H, BLOCK_D]
            tl.store(out_ptrs, (acc / sum_t[:, None]).to(out_ptr.dtype.element_ty), mask=out_ok)


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(n))


def _zero_padded(t: Tensor, dim: int, size: int) -> Tensor:
    """A new contiguous float32 copy of t, extended with zeros along dim to size."""
    padded = t.new_zeros(t.shape[:dim] + (size,) + t.shape[dim + 1:], dtype=torch.float32)
    padded.narrow(dim, 0, t.shape[dim]).copy_(t)
    return padded


def _dot_ready(arm: FoldedARM) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ARM's weights as the kernel reads them: float32 whatever the model's dtype (the
    refinement computes in float32, and tl.dot takes operands of one dtype: the float32 ReLU
    output with the projection). The conv's output channels are the operand of tl.dot: a
    power of two >= 16; zero filters with zero bias and zero projection columns add nothing
    to R."""
    dc = _pow2_at_least(arm.conv_weight.shape[0], MIN_DOT)
    return (_zero_padded(arm.conv_weight, 0, dc), _zero_padded(arm.conv_bias, 0, dc),
            _zero_padded(arm.proj_weight, 1, dc),
            arm.shift.to(torch.float32, memory_format=torch.contiguous_format, copy=True))


_dot_ready_weights = PreparedARMWeights(_dot_ready)


class KernelConstants(NamedTuple):
    """The constexprs of each kernel for a call (the launcher's and the kernel report's)."""
    refinement: dict
    partial_attention: dict
    merge: dict


def kernel_constants(shape: CrossAttentionStepShape, flags: CoverageFlags, launch: LaunchPlan) -> KernelConstants:
    block_h = _pow2_at_least(shape.nhead, 1)
    block_d = _pow2_at_least(shape.head_dim, MIN_DOT)
    return KernelConstants(
        refinement=dict(DC=_pow2_at_least(max(shape.dc, 1), MIN_DOT), BLOCK_L=launch.tile_l,
                        BLOCK_H=_pow2_at_least(shape.nhead, MIN_DOT),
                        BLOCK_C=_pow2_at_least(max(shape.channels, 1), MIN_DOT), DOT_PRECISION=FLOAT32_DOT),
        partial_attention=dict(REFINE=flags.refine, UPDATE_SELF=flags.update_self,
                               BLOCK_G=_pow2_at_least(launch.rows_per_slot, MIN_DOT), BLOCK_L=launch.split_l,
                               BLOCK_D=block_d, DOT_PRECISION=FLOAT32_DOT),
        merge=dict(UPDATE_CROSS=flags.update_cross, UPDATE_SELF=flags.update_self, BLOCK_L=launch.tile_l,
                   BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(launch.splits)),
    )


def cross_attention_step(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn,
                         shape: CrossAttentionStepShape, rows_per_image: Optional[int] = None,
                         num_warps: int = 4) -> Tuple[Tensor, Tensor]:
    """Launches the kernels on inputs `check_inputs` accepted (CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1) and `check_rows_per_image` cleared; returns (out, returned).
    rows_per_image: as the entry's (row r reads image r // G, or is skipped): the G rows
    of an image share its K/V reads; without it every row is its own slot."""
    if q.stride(2) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("triton cross_attention_step: q, k and v need a unit stride on head_dim")
    if key_padding_mask.stride(1) != 1:
        raise ValueError("triton cross_attention_step: key_padding_mask needs a unit stride along L")
    flags = coverage_flags(arm, coverage)
    image_index = image_index.contiguous()  # the kernels read image_index[row] at row
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    returned = torch.empty((shape.rows, shape.nhead, shape.length), device=q.device, dtype=torch.float32)
    if shape.rows == 0:
        return out, returned
    launch = launch_plan(shape.rows, shape.nhead, shape.length, rows_per_image)
    scratch = torch.empty((shape.rows, shape.nhead, shape.length) if flags.update_self else (1,),
                          device=q.device, dtype=torch.float32)
    stats = torch.empty((shape.rows, shape.nhead, launch.splits, STATS), device=q.device, dtype=torch.float32)
    partial = torch.empty((shape.rows, shape.nhead, launch.splits, shape.head_dim), device=q.device, dtype=torch.float32)
    dummy = returned  # stands for the tensors a mode does not read; the constexpr flags keep it untouched
    constants = kernel_constants(shape, flags, launch)
    refine_grid, attention_grid, merge_grid = launch.grids(shape.rows, shape.nhead, flags.refine)
    if flags.refine:
        conv_weight, conv_bias, proj_weight, shift = _dot_ready_weights(arm)
        launch_kernel(_refinement_kernel, refine_grid,
            key_padding_mask.view(torch.uint8), image_index, coverage, conv_weight, conv_bias, proj_weight, shift,
            returned,
            shape.length, shape.height, shape.width, shape.nhead, shape.channels,
            key_padding_mask.stride(0), coverage.stride(0),
            **constants.refinement, num_warps=num_warps,
        )
    launch_kernel(_partial_attention_kernel, attention_grid,
        q, k, v, key_padding_mask.view(torch.uint8), image_index, scratch, returned, stats, partial,
        shape.rows, shape.length, shape.nhead, shape.head_dim, launch.rows_per_slot, launch.splits,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        key_padding_mask.stride(0),
        **constants.partial_attention, num_warps=num_warps,
    )
    launch_kernel(_merge_kernel, merge_grid,
        image_index, coverage if flags.refine else dummy, prev_attn.contiguous() if flags.update_cross else dummy,
        scratch, returned, stats, partial, out,
        shape.length, shape.nhead, shape.head_dim, shape.channels, launch.splits,
        coverage.stride(0) if flags.refine else 0,
        **constants.merge, num_warps=num_warps,
    )
    return out, returned
