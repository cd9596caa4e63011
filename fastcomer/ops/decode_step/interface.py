"""What every backend of the decode step shares: its sizes, its plan (what it does with the
coverage), the input checks, and the ARM's weights prepared once for a kernel. Backends
import this module, never the entry (`fastcomer.ops.decode_step`)."""
import weakref
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ...model.arm import KERNEL_SIZE, FoldedARM
from ...tensor_cache import DerivedCache


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


# Tiles of the kernels' tensor-core products are multiples of 16 (tl.dot's and wmma's smallest
# dimension): rows of a slot, head_dim, the conv's channels and dc are padded to it.
MIN_DOT = 16
# The kernels split L so that a call launches this many programs (CTAs) when its rows allow:
# one per SM of an H100, so that batch 1 (one image, 2 directions x 10 beams) fills the GPU.
TARGET_PROGRAMS = 132
MAX_TILE = 128  # positions per program at most (registers, shared memory)
MAX_SPLIT = 64  # positions per partial-attention program at most: at 128 Triton's spills on sm_90


class LaunchPlan(NamedTuple):
    """How the kernels split one call (see triton_kernel's docstring; csrc does the same):
    the partial attention runs one program per (slot, head, split of L), the refinement and
    the merge one per (row, tile of L)."""
    slots: int  # groups of rows_per_slot consecutive rows that read one image
    rows_per_slot: int  # <= MIN_DOT: one tensor-core tile of rows
    split_l: int  # positions per program of the partial attention
    splits: int
    tile_l: int  # positions per program of the refinement and the merge
    tiles: int

    def grids(self, rows: int, nhead: int, refine: bool):
        """(refinement or None, partial attention, merge) grids."""
        return ((rows, self.tiles, 1) if refine else None, (self.slots, nhead, self.splits), (rows, self.tiles, 1))


def _tile(length: int, programs: int, largest: int) -> int:
    """The largest power-of-two tile in [MIN_DOT, largest] that cuts L into >= `programs`
    tiles (MIN_DOT when none does)."""
    fits = max(1, length // max(1, programs))
    return max(MIN_DOT, min(largest, 1 << (fits.bit_length() - 1)))


def launch_plan(rows: int, nhead: int, length: int, rows_per_image: Optional[int]) -> LaunchPlan:
    """Slots and tiles of a call: a slot is the largest divisor of rows_per_image (the
    dispatcher's G; 1 without it) up to MIN_DOT, so that its rows read one image; the tiles
    are the largest that still give TARGET_PROGRAMS programs per kernel. At the published
    batch-1 call (20 rows, G = 10, 8 heads, L = 256 or 1024): 256 programs of partial
    attention, 160 of refinement and of merge."""
    group = rows_per_image or 1
    rows_per_slot = max(d for d in range(1, min(group, MIN_DOT) + 1) if group % d == 0)
    slots = -(-rows // rows_per_slot)
    split_l = _tile(length, -(-TARGET_PROGRAMS // max(1, slots * nhead)), MAX_SPLIT)
    tile_l = _tile(length, -(-TARGET_PROGRAMS // max(1, rows)), MAX_TILE)
    return LaunchPlan(slots, rows_per_slot, split_l, -(-length // split_l), tile_l, -(-length // tile_l))


class DecodeStepPlan(NamedTuple):
    """What a step does with the coverage, as the kernels' flags."""
    refine: bool  # coverage given: A' = softmax(S - R)
    update_cross: bool  # coverage[:, :nhead] += prev_attn (after the conv read it)
    update_self: bool  # coverage[:, -nhead:] += A (after the conv read it)


class PreparedARMWeights:
    """`prepare(arm)`: the ARM's weights as a kernel reads them, computed once per folded ARM
    and reused while its four weight tensors are the same objects, unchanged as far as their
    version counters tell; `refresh_prepared_weights(arm)` prepares them again in place.

    The step runs once per layer per decoding step and is meant to be captured in a CUDA
    graph: after the first call a hit allocates nothing and launches nothing, and the
    prepared tensors keep their addresses (a refresh too). Entries are keyed weakly on
    arm.conv_weight (a FoldedARM, a NamedTuple, cannot be weakly referenced), so they go with
    the model. `prepare` must return new tensors, never the weights or views of them: an entry
    must not keep its key alive, nor show an in-place change of a weight before it is
    prepared again.
    """

    def __init__(self, prepare: Callable[[FoldedARM], Tuple[Tensor, ...]]):
        self._prepare = prepare
        self._cache = DerivedCache()
        _every_preparer.add(self)

    @staticmethod
    def _weights(arm: FoldedARM) -> Tuple[Tensor, ...]:
        # a refold (new BatchNorm statistics) shares conv_weight but brings new projection tensors
        return (arm.conv_weight, arm.conv_bias, arm.proj_weight, arm.shift)

    def _prepared(self, arm: FoldedARM) -> Callable[[], Tuple[Tensor, ...]]:
        def prepare() -> Tuple[Tensor, ...]:
            with torch.no_grad():
                return self._prepare(arm)
        return prepare

    def __call__(self, arm: FoldedARM) -> Tuple[Tensor, ...]:
        return self._cache.get(arm.conv_weight, self._weights(arm), self._prepared(arm))

    def refresh(self, arm: FoldedARM) -> None:
        """Prepare arm's weights again, into the tensors already prepared for it (if any)."""
        self._cache.refresh(arm.conv_weight, self._weights(arm), self._prepared(arm))


_every_preparer: "weakref.WeakSet[PreparedARMWeights]" = weakref.WeakSet()


def refresh_prepared_weights(arm: FoldedARM) -> None:
    """Every backend's prepared weights of `arm` computed again from its current values, in
    place (their addresses stay, for CUDA graphs). For a caller that changes arm's tensors in
    a way their version counters miss (the engine, whose folded ARM buffers are inference
    tensors refreshed at the start of each search)."""
    for preparer in list(_every_preparer):
        preparer.refresh(arm)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"fused_cross_attention_step: {message}")


def plan(arm: Optional[FoldedARM], coverage: Optional[Tensor]) -> DecodeStepPlan:
    refine = coverage is not None
    return DecodeStepPlan(refine, refine and arm.coverage.uses_cross, refine and arm.coverage.uses_self)


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
    return DecodeStepShape(rows, images, nhead, head_dim, length, height, length // height, channels, dc)


def check_rows_per_image(rows_per_image: Optional[int], shape: DecodeStepShape, image_index: Optional[Tensor]) -> None:
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


