"""The fused cross-attention step on the compiled CUDA extension `fastcomer._C`
(csrc/cross_attention_step.cu).

The extension takes raw device pointers, sizes and strides, and the stream, as integers, in
one `CrossAttentionStepParams` whose fields (csrc's one list of them,
`_C.CROSS_ATTENTION_STEP_FIELDS`) this module sets by name; it checks every tensor it hands
over (device, dtype, layout), since the kernel cannot, and launches on torch's current stream
of the tensors' device. The build's limits (heads, dc, head_dim, tiles) come from the
extension itself (`_C.LIMITS`).
"""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ...backends import cuda_extension_status
from ...model.arm import KERNEL_SIZE, FoldedARM
from ..triton_launch import on_device
from .inputs import CrossAttentionStepShape, coverage_flags
from .launch import MAX_TILE, MIN_DOT, LaunchPlan, PreparedARMWeights, launch_plan

DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def unsupported_reason(nhead: int, head_dim: int, dc: int, dtype: torch.dtype) -> Optional[str]:
    """Why this build's kernels cannot run a model of these sizes, or None (csrc's own limits);
    "not built" when the extension is absent."""
    module, why = cuda_extension_status()
    if module is None:
        return why
    limits = module.LIMITS
    if dtype not in DTYPES:
        return f"dtype {dtype} (float32, float16, bfloat16 are compiled)"
    if (limits["kernel_size"], limits["max_tile"], limits["tile"]) != (KERNEL_SIZE, MAX_TILE, MIN_DOT):
        return (f"this build's conv {limits['kernel_size']}x, tiles {limits['tile']}..{limits['max_tile']} differ from "
                f"fastcomer's {KERNEL_SIZE}x, {MIN_DOT}..{MAX_TILE}: rebuild the extension")
    if nhead > limits["max_heads"]:
        return f"nhead {nhead} > {limits['max_heads']}"
    if head_dim > limits["max_head_dim"]:
        return f"head_dim {head_dim} > {limits['max_head_dim']}"
    if dc not in (0, limits["dc"]):
        return f"ARM dc {dc} (compiled: {limits['dc']})"
    return None


def unsupported_inputs(shape: CrossAttentionStepShape, q: Tensor, coverage: Optional[Tensor],
                       prev_attn: Optional[Tensor]) -> Optional[str]:
    """Why this build's kernels cannot take this call, or None."""
    for name, t in (("coverage", coverage), ("prev_attn", prev_attn)):
        if t is not None and t.dtype != torch.float32:
            return f"{name} in {t.dtype} (the attentions and their running sums are float32)"
    return unsupported_reason(shape.nhead, shape.head_dim, shape.dc, q.dtype)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"cuda cross_attention_step: {message}")


def _float32_copies(arm: FoldedARM) -> Tuple[Tensor, ...]:
    """csrc reads the ARM's weights as contiguous float32; copies even of float32 weights, as
    PreparedARMWeights requires."""
    return tuple(t.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
                 for t in (arm.conv_weight, arm.conv_bias, arm.proj_weight, arm.shift))


_float32_weights = PreparedARMWeights(_float32_copies)


def _vector_aligned(t: Tensor, strides) -> bool:
    """Four consecutive elements of t load as one aligned vector at every used offset."""
    return t.data_ptr() % (4 * t.element_size()) == 0 and all(stride % 4 == 0 for stride in strides)


def split_buffers(shape: CrossAttentionStepShape, launch: LaunchPlan, device, stats_fields: int) -> Tuple[Tensor, Tensor]:
    """The kernels' per-split softmax statistics and unnormalised A'V."""
    stats = torch.empty((shape.rows, shape.nhead, launch.splits, stats_fields), device=device, dtype=torch.float32)
    partial = torch.empty((shape.rows, shape.nhead, launch.splits, shape.head_dim), device=device, dtype=torch.float32)
    return stats, partial


def launch_fields(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn,
                  shape: CrossAttentionStepShape, rows_per_image: Optional[int],
                  stats_fields: int) -> Tuple[Dict[str, Optional[Tensor]], Dict[str, object]]:
    """Every field of csrc's CrossAttentionStepParams for this call, by name, on inputs the
    entry checked: (buffers, scalars). buffers: pointer field -> the tensor it points at (None:
    absent), the outputs `out` and `returned` and the kernels' scratch included; scalars: sizes,
    strides, flags, the split of L, and dtype by name."""
    flags = coverage_flags(arm, coverage)
    weights = _float32_weights(arm) if flags.refine else (None,) * 4
    launch = launch_plan(shape.rows, shape.nhead, shape.length, rows_per_image)
    stats, partial = split_buffers(shape, launch, q.device, stats_fields)
    attention_map = lambda: torch.empty((shape.rows, shape.nhead, shape.length), device=q.device, dtype=torch.float32)
    buffers = dict(
        q=q, k=k, v=v, key_padding_mask=key_padding_mask, image_index=image_index.contiguous(),
        coverage=coverage if flags.refine else None,
        prev_attn=prev_attn.contiguous() if flags.update_cross else None,
        **dict(zip(("conv_weight", "conv_bias", "proj_weight", "shift"), weights)),
        scratch=attention_map() if flags.update_self else None, returned=attention_map(),
        out=torch.empty(q.shape, device=q.device, dtype=q.dtype), stats=stats, partial=partial,
    )
    head_dim_vectors = shape.head_dim % 4 == 0
    scalars = dict(
        image_index_int64=image_index.dtype == torch.int64,
        coverage_stride_row=coverage.stride(0) if flags.refine else 0, update_self=flags.update_self,
        rows_per_slot=launch.rows_per_slot, split_length=launch.split_l, splits=launch.splits,
        tile_length=launch.tile_l, vectorized_q=head_dim_vectors and _vector_aligned(q, q.stride()[:2]),
        vectorized_kv=head_dim_vectors and all(_vector_aligned(t, t.stride()[:3]) for t in (k, v)),
        dtype=DTYPES[q.dtype],
        rows=shape.rows, nhead=shape.nhead, head_dim=shape.head_dim, length=shape.length, height=shape.height,
        width=shape.width, channels=shape.channels, dc=shape.dc,
        q_stride_row=q.stride(0), q_stride_head=q.stride(1),
        k_stride_image=k.stride(0), k_stride_head=k.stride(1), k_stride_pos=k.stride(2),
        v_stride_image=v.stride(0), v_stride_head=v.stride(1), v_stride_pos=v.stride(2),
        mask_stride_image=key_padding_mask.stride(0),
    )
    return buffers, scalars


def launch_params(module, buffers: Dict[str, Optional[Tensor]], scalars: Dict[str, object]):
    """The extension's CrossAttentionStepParams holding `launch_fields`' values (buffers as
    device addresses), after checking that they name exactly the build's fields."""
    differ = set(module.CROSS_ATTENTION_STEP_FIELDS) ^ (set(buffers) | set(scalars))
    _require(not differ, f"the launch fields differ from this build's: {sorted(differ)} (rebuild the extension)")
    params = module.CrossAttentionStepParams()
    for name, tensor in buffers.items():
        setattr(params, name, 0 if tensor is None else tensor.data_ptr())
    for name, value in scalars.items():
        setattr(params, name, getattr(module.DType, value) if name == "dtype" else value)
    return params


def cross_attention_step(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn,
                         shape: CrossAttentionStepShape, rows_per_image: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Launches csrc's kernels on inputs `check_inputs` accepted and `unsupported_inputs` and
    `check_rows_per_image` cleared (the entry checks them); returns (out, returned).
    rows_per_image: as the entry's: the G rows of an image share its K/V reads."""
    module, why = cuda_extension_status()
    if module is None:
        raise RuntimeError(why)
    _require(q.is_cuda, f"tensors must be on a CUDA device, got {q.device}")
    _require(q.stride(2) == 1 and k.stride(3) == 1 and v.stride(3) == 1, "q, k, v need a unit stride on head_dim")
    _require(key_padding_mask.stride(1) == 1, "key_padding_mask needs a unit stride along L")
    buffers, scalars = launch_fields(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn, shape,
                                     rows_per_image, module.LIMITS["stats"])
    params = launch_params(module, buffers, scalars)
    with on_device(q.device):  # the stream of the tensors' device
        module.cross_attention_step(params, torch.cuda.current_stream().cuda_stream)
    return buffers["out"], buffers["returned"]
