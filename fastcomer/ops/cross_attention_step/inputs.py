"""What every backend of the cross-attention step shares: its sizes, what it does with the
coverage, and the input checks. Backends import this module, never the entry
(`fastcomer.ops.cross_attention_step`)."""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ...model.arm import KERNEL_SIZE, FoldedARM


class CrossAttentionStepShape(NamedTuple):
    rows: int
    images: int
    nhead: int
    head_dim: int
    length: int  # L = height * width
    height: int
    width: int
    channels: int  # coverage channels C: nhead per coverage kind
    dc: int  # ARM conv output channels


class CoverageFlags(NamedTuple):
    """What a step does with the coverage, as the kernels' flags."""
    refine: bool  # coverage given: A' = softmax(S - R)
    update_cross: bool  # coverage[:, :nhead] += prev_attn (after the conv read it)
    update_self: bool  # coverage[:, -nhead:] += A (after the conv read it)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"cross_attention_step: {message}")


def coverage_flags(arm: Optional[FoldedARM], coverage: Optional[Tensor]) -> CoverageFlags:
    refine = coverage is not None
    return CoverageFlags(refine, refine and arm.coverage.uses_cross, refine and arm.coverage.uses_self)


def check_inputs(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn) -> CrossAttentionStepShape:
    """Validates shapes, dtypes and devices shared by every backend; returns the sizes."""
    _check(q.dim() == 3, f"q must be [rows, nhead, head_dim], got shape {tuple(q.shape)}")
    rows, nhead, head_dim = q.shape
    _check(k.dim() == 4 and k.shape[1] == nhead and k.shape[3] == head_dim,
           f"k must be [images, nhead={nhead}, L, head_dim={head_dim}], got {tuple(k.shape)}")
    images, length = k.shape[0], k.shape[2]
    _check(v.shape == k.shape, f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    _check(q.dtype == k.dtype == v.dtype, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check(key_padding_mask.shape == (images, length) and key_padding_mask.dtype == torch.bool,
           f"key_padding_mask must be bool [{images}, {length}], got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    _check(image_index.shape == (rows,) and image_index.dtype in (torch.int32, torch.int64),
           f"image_index must be int32/int64 [{rows}], got {image_index.dtype} {tuple(image_index.shape)}")
    _check(height > 0 and length % height == 0, f"height {height} does not divide L = {length}")
    channels = dc = 0
    if coverage is not None:
        _check(arm is not None, "coverage given without the ARM")
        channels = arm.coverage.channels(nhead)
        dc = arm.conv_weight.shape[0]
        kernel = (KERNEL_SIZE, KERNEL_SIZE)
        _check(tuple(arm.conv_weight.shape) == (dc, channels, *kernel),
               f"arm.conv_weight must be [dc, {channels}, {KERNEL_SIZE}, {KERNEL_SIZE}] for nhead {nhead}, "
               f"got {tuple(arm.conv_weight.shape)}")
        _check(tuple(arm.conv_bias.shape) == (dc,) and tuple(arm.proj_weight.shape) == (nhead, dc)
               and tuple(arm.shift.shape) == (nhead,), "arm.conv_bias [dc], proj_weight [nhead, dc], shift [nhead] expected")
        _check(coverage.shape == (rows, channels, length),
               f"coverage must be [{rows}, {channels}, {length}], got {tuple(coverage.shape)}")
        _check(coverage.dtype.is_floating_point, f"coverage must be floating point, got {coverage.dtype}")
        # Any row stride (a layer's slice of an all-layers tensor), rows not overlapping: it is updated in place.
        _check(coverage.stride(2) == 1 and coverage.stride(1) == length
               and (rows <= 1 or coverage.stride(0) >= channels * length),
               f"coverage must be contiguous within each row, rows not overlapping (it is updated in place), "
               f"got strides {coverage.stride()}")
        if arm.coverage.uses_cross:
            _check(prev_attn is not None, "prev_attn (the previous layer's returned attention) is needed to "
                                          "update the cross coverage")
    if prev_attn is not None:
        _check(prev_attn.shape == (rows, nhead, length),
               f"prev_attn must be [{rows}, {nhead}, {length}], got {tuple(prev_attn.shape)}")
        _check(prev_attn.dtype.is_floating_point, f"prev_attn must be floating point, got {prev_attn.dtype}")
    tensors = [q, k, v, key_padding_mask, image_index, coverage, prev_attn]
    if arm is not None:
        tensors += [arm.conv_weight, arm.conv_bias, arm.proj_weight, arm.shift]
    devices = {t.device for t in tensors if t is not None}
    _check(len(devices) == 1, f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return CrossAttentionStepShape(rows, images, nhead, head_dim, length, height, length // height, channels, dc)


def check_rows_per_image(rows_per_image: Optional[int], shape: CrossAttentionStepShape, image_index: Optional[Tensor]) -> None:
    """rows_per_image = G promises that row r reads image r // G or is skipped (a negative
    image index): the rows must be images x G, and on the CPU (where it costs no device sync;
    not when traced, where a host check would break the graph) the promise is checked, unless
    image_index is None (the caller vouches for it)."""
    if rows_per_image is None:
        return
    _check(isinstance(rows_per_image, int) and rows_per_image >= 1,
           f"rows_per_image must be a positive int, got {rows_per_image!r}")
    _check(shape.rows == shape.images * rows_per_image,
           f"{shape.rows} rows are not {shape.images} images x rows_per_image={rows_per_image}")
    if image_index is not None and image_index.device.type == "cpu" and not torch.compiler.is_compiling():
        grouped = torch.arange(shape.rows) // rows_per_image
        _check(bool(((image_index == grouped) | (image_index < 0)).all()),
               "with rows_per_image, row r must read image r // rows_per_image or be skipped (a negative image index)")


def returned_dtype(q: Tensor) -> torch.dtype:
    """float32 for the kernels' dtypes (float32, float16, bfloat16); float64 stays float64."""
    return torch.promote_types(q.dtype, torch.float32)


def check_image_index(image_index: Tensor, images: int) -> None:
    """Every row's image exists (negative = skipped row): the kernels read image_index[r]'s K/V
    unchecked. On the CPU it raises ValueError at once; elsewhere (CUDA) the check runs on the
    device, without a host sync: a failure is a device-side assert, reported by the next
    sync, after which the CUDA context is lost."""
    if image_index.numel() == 0:
        return
    largest = image_index.max()
    if image_index.device.type != "cpu":
        torch._assert_async(largest < images, "cross_attention_step: image_index past the number of images")
    elif not torch.compiler.is_compiling() and int(largest) >= images:  # traced, the host check would break the graph
        raise ValueError(f"cross_attention_step: image_index must be < {images} (the number of images) "
                         f"or negative (a skipped row), got {int(largest)}")
