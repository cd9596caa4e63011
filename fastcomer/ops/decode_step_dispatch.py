"""The fused decode step over flat rows: one call per decoder layer per step, for every beam.

`fused_cross_attention_step` is what the decoding engine calls. It computes the function of
`fastcomer.ops.decode_step.cross_attention_step` (the reference) for rows that name their
image through `image_index` instead of being grouped [I, G], and runs it on the CUDA
extension, the Triton kernel or plain PyTorch (see `fastcomer.backend`).
"""
import weakref
from typing import Callable, Iterable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

from .. import backend as backends
from ..model.arm import FoldedARM
from .decode_step import cross_attention_step


class DecodeStepShape(NamedTuple):
    rows: int
    images: int
    nhead: int
    head_dim: int
    length: int  # L = height * width
    height: int
    width: int
    channels: int  # coverage channels C: nhead per coverage kind
    dc: int  # ARM conv output channels


class DecodeStepPlan(NamedTuple):
    """What a step does with the coverage, as the kernels' flags."""
    refine: bool  # coverage given: A' = softmax(S - R)
    update_cross: bool  # coverage[:, :nhead] += prev_attn (after the conv read it)
    update_self: bool  # coverage[:, -nhead:] += A (after the conv read it)


class _PreparedEntry(NamedTuple):
    weights: Tuple["weakref.ref[Tensor]", ...]  # the ARM's four weights it was prepared from
    stamp: Tuple[Tuple[int, Optional[int]], ...]  # their storage addresses and versions then
    prepared: Tuple[Tensor, ...]


def tensors_stamp(tensors: Iterable[Tensor]) -> Tuple[Tuple[int, Optional[int]], ...]:
    """Where each tensor's data is and how often it was changed in place. Inference tensors
    keep no version counter (the engine folds under inference mode): for them only the
    address counts, and their in-place changes go unseen."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in tensors)


class PreparedARMWeights:
    """`prepare(arm)`: the ARM's weights as a kernel reads them, computed once per folded ARM
    and reused while its four weight tensors are the same objects, unchanged.

    The step runs once per layer per decoding step and is meant to be captured in a CUDA
    graph: after the first call a hit allocates nothing and launches nothing, and the
    prepared tensors keep their addresses. Entries are keyed weakly on arm.conv_weight (a
    FoldedARM, a NamedTuple, cannot be weakly referenced), so they go with the model.
    `prepare` must return new tensors, never the weights or views of them: an entry must not
    keep its key alive, nor show an in-place change of a weight before it is prepared again.
    """

    def __init__(self, prepare: Callable[[FoldedARM], Tuple[Tensor, ...]]):
        self._prepare = prepare
        self._entries = WeakTensorKeyDictionary()  # conv_weight -> _PreparedEntry

    def __call__(self, arm: FoldedARM) -> Tuple[Tensor, ...]:
        weights = (arm.conv_weight, arm.conv_bias, arm.proj_weight, arm.shift)
        stamp = tensors_stamp(weights)
        entry = self._entries.get(arm.conv_weight)
        # a refold (new BatchNorm statistics) shares conv_weight but brings new projection tensors
        if entry is not None and entry.stamp == stamp and all(ref() is t for ref, t in zip(entry.weights, weights)):
            return entry.prepared
        with torch.no_grad():
            prepared = self._prepare(arm)
        self._entries[arm.conv_weight] = _PreparedEntry(tuple(weakref.ref(t) for t in weights), stamp, prepared)
        return prepared


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"fused_cross_attention_step: {message}")


def plan(arm: Optional[FoldedARM], coverage: Optional[Tensor]) -> DecodeStepPlan:
    refine = coverage is not None
    return DecodeStepPlan(refine, refine and arm.cross_coverage, refine and arm.self_coverage)


def check_inputs(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn) -> DecodeStepShape:
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
        channels = nhead * (int(arm.cross_coverage) + int(arm.self_coverage))
        dc = arm.conv_weight.shape[0]
        _check(tuple(arm.conv_weight.shape) == (dc, channels, 5, 5),
               f"arm.conv_weight must be [dc, {channels}, 5, 5] for nhead {nhead}, got {tuple(arm.conv_weight.shape)}")
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
        if arm.cross_coverage:
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
    return DecodeStepShape(rows, images, nhead, head_dim, length, height, length // height, channels, dc)


def returned_dtype(q: Tensor) -> torch.dtype:
    """float32 for the kernels' dtypes (float32, float16, bfloat16); float64 stays float64."""
    return torch.promote_types(q.dtype, torch.float32)


def torch_step(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn) -> Tuple[Tensor, Tensor]:
    """The reference over flat rows: gathers each active row's K/V (a copy per row: this is
    the checking path, not the fast one) and scatters the coverage update back."""
    active = (image_index >= 0).nonzero().squeeze(1)
    image = image_index[active].long()
    sub_coverage = None if coverage is None else coverage[active]
    sub_prev = None if prev_attn is None else prev_attn[active]
    result, sub_returned = cross_attention_step(q[active][:, None], k[image], v[image], key_padding_mask[image],
                                                height, arm, sub_coverage, sub_prev)
    out = torch.zeros_like(q)
    out[active] = result[:, 0]
    returned = q.new_zeros(q.shape[0], q.shape[1], k.shape[2], dtype=returned_dtype(q))
    returned[active] = sub_returned.to(returned.dtype)
    if coverage is not None:
        coverage[active] = sub_coverage
    return out, returned


def fused_cross_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    image_index: Tensor,
    height: int,
    arm: Optional[FoldedARM],
    coverage: Optional[Tensor],
    prev_attn: Optional[Tensor],
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """One step of cross-attention with the ARM for all rows of one decoder layer.

    q [R, nhead, head_dim] (already scaled); k, v [I, nhead, L, head_dim] (each image once;
    any strides with a unit last stride); key_padding_mask [I, L] bool (True = padding);
    image_index [R] int32/int64: row r reads image image_index[r], or is inactive when it is
    negative (its output and returned attention are 0, its coverage row is not touched);
    height: of the h x w = L feature map (row-major); arm: the folded ARM (needed when a
    coverage is given).
    coverage [R, C, L] (cross block first; each row contiguous, any row stride), or None for
    layer 0 / a model without ARM: this layer's sums over the previous steps, which it refines
    with; after the conv has read them, this step is added in place: cross block += prev_attn,
    self block += A (the unrefined attention).
    prev_attn [R, nhead, L]: what the previous layer returned at this step (needed when
    refining with cross coverage; ignored otherwise).
    backend: 'auto' | 'cuda' | 'triton' | 'torch' (default: $FASTCOMER_BACKEND, else auto).
    Returns (A'V [R, nhead, head_dim] in q's dtype, returned [R, nhead, L]: the attention this
    layer returns, A' (A without refinement), float32 (float64 for float64 inputs), which is
    the next layer's prev_attn).
    """
    shape = check_inputs(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn)
    args = (q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn)
    name = backends.resolve(q, backend, cuda_available=backends.cuda_extension_usable())
    if name == "cuda":
        from .decode_step_cuda import cuda_step, unsupported_reason

        why = unsupported_reason(shape, q, coverage, prev_attn)
        if why is None:
            return cuda_step(*args, shape=shape)
        if backends.requested_backend(backend) == "cuda":
            raise ValueError(f"backend 'cuda' cannot run this step: {why}")
        # auto: the Triton kernel computes the same function for shapes the CUDA build lacks
        name = "triton" if backends.triton_status()[0] else "torch"
    if name == "triton":
        from .decode_step_triton import triton_step

        return triton_step(*args, shape=shape)
    return torch_step(*args)
