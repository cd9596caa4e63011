"""How the kernels of the cross-attention step split one call (the Triton kernels and csrc's
alike; the static report compiles the same split), and the ARM's weights prepared once for a
kernel."""
import weakref
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ...model.arm import FoldedARM
from ...tensor_cache import DerivedCache


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
