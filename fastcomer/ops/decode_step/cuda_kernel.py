"""The fused decode step on the compiled CUDA extension `fastcomer._C` (csrc/decode_step.cu).

The extension takes raw device pointers, sizes and strides, and the stream, as integers:
this module checks every tensor it hands over (device, dtype, layout), since the kernel
cannot, and launches on torch's current stream.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ...backends import cuda_extension_status
from ...model.arm import KERNEL_SIZE, FoldedARM
from .interface import DecodeStepShape, LaunchPlan, PreparedARMWeights, launch_plan, plan

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_NHEAD = 16
DC = 32
STATS = 4  # floats per split of a row and head in `stats`
MAX_HEAD_DIM = 128


def unsupported_reason(shape: DecodeStepShape, q: Tensor, coverage: Optional[Tensor], prev_attn: Optional[Tensor]) -> Optional[str]:
    """Why this build's kernels cannot take the step, or None (mirrors csrc's checks)."""
    if q.dtype not in DTYPE_CODES:
        return f"dtype {q.dtype} (float32, float16, bfloat16 are compiled)"
    for name, t in (("coverage", coverage), ("prev_attn", prev_attn)):
        if t is not None and t.dtype != torch.float32:
            return f"{name} in {t.dtype} (the attentions and their running sums are float32)"
    if shape.nhead > MAX_NHEAD:
        return f"nhead {shape.nhead} > {MAX_NHEAD}"
    if shape.head_dim > MAX_HEAD_DIM:
        return f"head_dim {shape.head_dim} > {MAX_HEAD_DIM}"
    if shape.dc not in (0, DC):
        return f"ARM dc {shape.dc} (compiled: {DC})"
    module = cuda_extension_status()[0]
    if module is not None and getattr(module, "KERNEL_SIZE", None) != KERNEL_SIZE:
        return f"this build's conv is {getattr(module, 'KERNEL_SIZE', '?')}x, not {KERNEL_SIZE}x{KERNEL_SIZE}: rebuild"
    return None


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"cuda decode step: {message}")


def _float32_copies(arm: FoldedARM) -> Tuple[Tensor, ...]:
    """csrc reads the ARM's weights as contiguous float32; copies even of float32 weights, as
    PreparedARMWeights requires."""
    return tuple(t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                 for t in (arm.conv_weight, arm.conv_bias, arm.proj_weight, arm.shift))


_float32_weights = PreparedARMWeights(_float32_copies)


def _vector_aligned(t: Tensor, strides) -> bool:
    """Four consecutive elements of t load as one aligned vector at every used offset."""
    return t.data_ptr() % (4 * t.element_size()) == 0 and all(stride % 4 == 0 for stride in strides)


def split_buffers(shape: DecodeStepShape, launch: LaunchPlan, device) -> Tuple[Tensor, Tensor]:
    """The kernels' per-split softmax statistics and unnormalised A'V."""
    stats = torch.empty((shape.rows, shape.nhead, launch.splits, STATS), device=device, dtype=torch.float32)
    partial = torch.empty((shape.rows, shape.nhead, launch.splits, shape.head_dim), device=device, dtype=torch.float32)
    return stats, partial


def cuda_step(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn,
              shape: DecodeStepShape, rows_per_image: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Launches csrc's kernels on inputs `check_inputs` accepted and `unsupported_reason` and
    `check_rows_per_image` cleared (the dispatcher checks them); returns (out, returned).
    rows_per_image: as the dispatcher's: the G rows of an image share its K/V reads."""
    module, why = cuda_extension_status()
    if module is None:
        raise RuntimeError(why)
    _require(q.is_cuda, f"tensors must be on a CUDA device, got {q.device}")
    _require(q.stride(2) == 1 and k.stride(3) == 1 and v.stride(3) == 1, "q, k, v need a unit stride on head_dim")
    _require(key_padding_mask.stride(1) == 1, "key_padding_mask needs a unit stride along L")
    image_index = image_index.contiguous()
    flags = plan(arm, coverage)
    prev_attn = prev_attn.contiguous() if flags.update_cross else None
    conv_weight, conv_bias, proj_weight, shift = (w.data_ptr() for w in _float32_weights(arm)) if flags.refine else (0, 0, 0, 0)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    returned = torch.empty((shape.rows, shape.nhead, shape.length), device=q.device, dtype=torch.float32)
    scratch = torch.empty((shape.rows, shape.nhead, shape.length) if flags.update_self else (0,), device=q.device,
                          dtype=torch.float32)
    launch = launch_plan(shape.rows, shape.nhead, shape.length, rows_per_image)
    stats, partial = split_buffers(shape, launch, q.device)
    head_dim_vectors = shape.head_dim % 4 == 0
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream().cuda_stream
        module.decode_step(
            q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), key_padding_mask=key_padding_mask.data_ptr(),
            image_index=image_index.data_ptr(), image_index_int64=image_index.dtype == torch.int64,
            coverage=coverage.data_ptr() if flags.refine else 0,
            coverage_stride_row=coverage.stride(0) if flags.refine else 0,
            prev_attn=prev_attn.data_ptr() if flags.update_cross else 0, update_self=flags.update_self,
            conv_weight=conv_weight, conv_bias=conv_bias, proj_weight=proj_weight, shift=shift,
            scratch=scratch.data_ptr() if flags.update_self else 0, returned=returned.data_ptr(), out=out.data_ptr(),
            stats=stats.data_ptr(), partial=partial.data_ptr(),
            dtype=DTYPE_CODES[q.dtype],
            rows=shape.rows, nhead=shape.nhead, head_dim=shape.head_dim, length=shape.length, height=shape.height,
            channels=shape.channels, dc=shape.dc,
            q_stride_row=q.stride(0), q_stride_head=q.stride(1),
            k_stride_image=k.stride(0), k_stride_head=k.stride(1), k_stride_pos=k.stride(2),
            v_stride_image=v.stride(0), v_stride_head=v.stride(1), v_stride_pos=v.stride(2),
            mask_stride_image=key_padding_mask.stride(0),
            rows_per_slot=launch.rows_per_slot, split_length=launch.split_l, splits=launch.splits,
            tile_length=launch.tile_l, vectorized_q=head_dim_vectors and _vector_aligned(q, q.stride()[:2]),
            vectorized_kv=head_dim_vectors and all(_vector_aligned(t, t.stride()[:3]) for t in (k, v)), stream=stream,
        )
    return out, returned
