"""The incremental decoder: one step of CoMER's decoder for the newest token of every
row, over static buffers allocated once.

Rows are grouped in slots of `group` rows that read one image (for the beam search, a
slot is one search: the beams of one image in one direction). Per decoder layer the state holds
- the cross-attention K/V of each slot's image, computed once and shared by its rows;
- the self-attention K/V of every row for the steps so far, preallocated to max_len;
- the ARM coverage running sums of every row (see ops/cross_attention_step/reference.py),
so a step costs O(L) per row for the cross-attention and the ARM, whatever the prefix.

Shapes never change and the step counter lives on the device, so a step has no host
sync and can be captured in a CUDA graph. The only Python-side argument of a step is its
window: how many prefix positions the self-attention reads and a reorder copies, any
value from the prefix length up to max_len (positions past the prefix hold PAD tokens,
which the self-attention masks); with CUDA graphs `prefix_window` rounds it up so that few
graphs serve all lengths, otherwise it is the prefix itself.

A search may also join a running state (`insert`, in-flight batching): its rows start at the
current position, PAD before it (masked like the positions past a prefix), their positional
encoding counted from there (`first_position`); its image may be smaller than the state's
feature map, whose rest is then padding (masked: its coverage stays 0, as the ARM
convolution's own zero padding).
"""
from typing import Optional

import torch
from torch import Tensor

from ..model.arm import FoldedARM, folded_copy
from ..ops.cross_attention_step.custom_op import cross_attention_step_op  # kernels: one custom op when traced
from ..ops.cross_attention_step.launch import refresh_prepared_weights
from ..ops.dispatch import DispatchPlan
from ..ops.feed_forward_step.custom_op import feed_forward_step_op
from ..ops.self_attention_step.custom_op import self_attention_step_op
from ..vocab import PAD_IDX

# With CUDA graphs prefix windows are multiples of this: at most WINDOW_STEP - 1 wasted
# positions per step, and max_len / WINDOW_STEP windows (graphs) per state.
WINDOW_STEP = 32


def prefix_window(length: int, max_len: int, graphs: bool) -> int:
    """The window of a step whose rows hold `length` tokens: the prefix itself, or with CUDA
    graphs (one per window) the prefix rounded up to a multiple of WINDOW_STEP."""
    return min(max_len, -(-length // WINDOW_STEP) * WINDOW_STEP) if graphs else length


def feature_corner(x: Tensor, dim: int, map_width: int, height: int, width: int) -> Tensor:
    """The view of x's top left height x width feature positions: dimension dim of x holds
    row-major feature maps map_width wide (it becomes two, rows and columns)."""
    return x.unflatten(dim, (-1, map_width)).narrow(dim, 0, height).narrow(dim + 1, 0, width)


def split_heads(x: Tensor, nhead: int) -> Tensor:
    """[b, L, d] -> [b, nhead, L, head_dim]."""
    b, L, d = x.shape
    return x.view(b, L, nhead, d // nhead).transpose(1, 2)


class DecodingState:
    # The per-row state tensors (which a reorder gathers and a take copies): their row dimension,
    # and the dimension of positions of which a reorder gathers the window only (None: all of it).
    REORDERED = {"tokens": (0, None), "self_keys": (1, 4), "self_values": (1, 3), "coverage": (1, None)}
    # The dimensions of token positions and of feature positions (None: none) of the state
    # tensors, along which `take` moves a state to other sizes.
    POSITIONS = {"tokens": (1, None), "self_keys": (4, None), "self_values": (3, None), "coverage": (None, 3),
                 "memory_kv": (None, 4), "memory_mask": (None, 1)}

    def __init__(self, decoder, slots: int, group: int, height: int, width: int, max_len: int,
                 dtype: torch.dtype, device, plan: DispatchPlan, fixed_addresses: bool = False):
        """Buffers for `slots` slots of `group` rows, each reading one image of h x w features, up to max_len
        tokens per row. plan: the search's dispatch plan (`fastcomer.ops.dispatch.decoding_plan`):
        each step op's backend and the coverage dtype. fixed_addresses: the state tensors
        never move (CUDA graphs read them by address): a reorder copies the gathered rows
        back instead of swapping buffers."""
        layers = decoder.model.layers
        d = decoder.proj.in_features
        self.decoder = decoder
        self.arm = folded_copy(decoder.model.arm)
        self.nhead = decoder.nhead
        self.slots, self.group, self.rows = slots, group, slots * group
        self.height, self.width, self.length = height, width, height * width
        self.max_len = max_len
        head_dim = d // self.nhead
        like = torch.empty(0, dtype=dtype, device=device)
        self.plan = plan
        self.memory_kv = like.new_zeros(len(layers), 2, slots, self.nhead, self.length, head_dim)
        self.memory_mask = torch.ones(slots, self.length, dtype=torch.bool, device=device)
        self.slot_of_row = torch.arange(slots, dtype=torch.int32, device=device).repeat_interleave(group)
        self.image_index = self.slot_of_row.clone()  # what the fused kernels read: -1 skips a row
        # One tensor per kind of row state, so that a reorder is one gather each. The self K/V
        # are layer-major, so that each layer's K^T [rows, nhead, head_dim, window] and V
        # [rows, nhead, window, head_dim] are matmul operands as they lie (no copy; K^T as the
        # copy that matmul made of a K cache, so the scores are bitwise the same). Zeros, not
        # garbage: the self-attention's masked positions multiply V by weight 0.
        self.self_keys = like.new_zeros(len(layers), self.rows, self.nhead, head_dim, max_len)
        self.self_values = like.new_zeros(len(layers), self.rows, self.nhead, max_len, head_dim)
        # Layer j > 0 refines with coverage[j - 1]; layer 0 has none. Layer-major too: each
        # layer's [rows, C, L] is contiguous, as the torch path's convolution reads it (no copy).
        channels = self.arm.coverage.channels(self.nhead) if self.arm else 0
        self.coverage = (like.new_zeros(len(layers) - 1, self.rows, channels, self.length,
                                        dtype=plan.coverage_dtype) if self.arm else None)
        self.tokens = torch.full((self.rows, max_len), PAD_IDX, dtype=torch.long, device=device)
        # A reorder gathers into these spares (index_select, a row copy each), then swaps them
        # with the state's, or with fixed addresses copies them back. Zeros, like the state's:
        # once swapped in, their positions past the gathered window are read as masked ones.
        self.fixed_addresses = fixed_addresses
        self.spares = {name: torch.zeros_like(getattr(self, name)) for name in self.REORDERED
                       if getattr(self, name) is not None}
        self.position = torch.zeros((), dtype=torch.long, device=device)  # index of the newest token
        # Where each row's start token is: 0, or the position at which its search joined (insert).
        # A reorder leaves it: rows continue rows of their own slot.
        self.first_position = torch.zeros(self.rows, dtype=torch.long, device=device)

    def start(self, feature: Tensor, feature_mask: Tensor, tokens: Tensor) -> None:
        """A new search: feature [slots, h, w, d] and feature_mask [slots, h, w] are the
        slots' images; tokens [rows] are the rows' first tokens. In place."""
        if feature.shape[:3] != (self.slots, self.height, self.width):
            raise ValueError(f"feature must be [{self.slots}, {self.height}, {self.width}, d], "
                             f"got {tuple(feature.shape)}")
        self.refresh_arm(folded_copy(self.decoder.model.arm))
        memory = feature.reshape(self.slots, self.length, -1)
        for j, layer in enumerate(self.decoder.model.layers):
            for kind, x in enumerate(layer.multihead_attn.project_key_value(memory)):
                self.memory_kv[j, kind] = split_heads(x, self.nhead)
        self.memory_mask.copy_(feature_mask.reshape(self.slots, self.length))
        if self.coverage is not None:
            self.coverage.zero_()
        self.tokens.fill_(PAD_IDX)
        self.tokens[:, 0] = tokens
        self.position.zero_()
        self.first_position.zero_()

    def insert(self, slot: int, feature: Tensor, feature_mask: Tensor, tokens: Tensor) -> None:
        """A new search in `slot`, joining the others at the current position: feature [h, w, d]
        and feature_mask [h, w] are its image's, at most the state's size (its map goes in the
        top left corner, the rest is padding); tokens [group] are its rows' first tokens. Its rows
        hold PAD up to the current position and their start token there; their coverage is 0.
        The slot's rows must hold finite caches (any earlier search's, or zeros): the
        self-attention weighs the PAD positions' values by 0. In place."""
        h, w, _ = feature.shape
        if h > self.height or w > self.width:
            raise ValueError(f"feature of {h} x {w} positions does not fit in the state's {self.height} x {self.width}")
        rows = slice(slot * self.group, (slot + 1) * self.group)
        self.refresh_arm(folded_copy(self.decoder.model.arm))
        memory_kv, memory_mask = self.memory_kv[:, :, slot], self.memory_mask[slot]
        memory_kv.zero_()
        memory_mask.fill_(True)
        feature_corner(memory_mask, 0, self.width, h, w).copy_(feature_mask)
        corner = feature_corner(memory_kv, 3, self.width, h, w)  # [layers, 2, nhead, h, w, head_dim]
        memory = feature.reshape(h * w, -1)
        for j, layer in enumerate(self.decoder.model.layers):
            for kind, x in enumerate(layer.multihead_attn.project_key_value(memory)):
                corner[j, kind].copy_(x.view(h, w, self.nhead, -1).permute(2, 0, 1, 3))
        if self.coverage is not None:
            self.coverage[:, rows].zero_()
        self.tokens[rows] = PAD_IDX
        self.tokens[rows].index_copy_(1, self.position.view(1), tokens.view(-1, 1))
        self.first_position[rows] = self.position

    def take(self, other: "DecodingState", slots: Tensor, shift: int = 0) -> None:
        """Slot i := other's slot slots[i], image, rows and caches (a smaller state continuing
        some of other's searches). In place.

        other may differ in feature map size and max_len: each slot's map goes in the top left
        corner of this state's (the rest padding), which the taken images must fit in, and the
        positions from `shift` on are taken (as many as fit: the taken searches must fit), so
        that with shift > 0 searches that joined late (none before shift) start earlier."""
        rows = (slots[:, None] * self.group + torch.arange(self.group, device=slots.device)).view(-1)
        self.refresh_arm(other.arm)
        height, width = min(self.height, other.height), min(self.width, other.width)
        positions = min(self.max_len, other.max_len - shift)
        resized = (height, width, positions) != (self.height, self.width, self.max_len)
        taken = {"memory_kv": (2, slots), "memory_mask": (0, slots),
                 **{name: (self.REORDERED[name][0], rows) for name in self.spares}}
        for name, (row_dim, index) in taken.items():
            target, source = getattr(self, name), getattr(other, name).index_select(row_dim, index)
            token_dim, feature_dim = self.POSITIONS[name]
            if resized:  # what is not taken is padding: PAD tokens, masked memory, zeros
                target.fill_({"tokens": PAD_IDX, "memory_mask": True}.get(name, 0))
            if token_dim is not None:
                target, source = target.narrow(token_dim, 0, positions), source.narrow(token_dim, shift, positions)
            if feature_dim is not None:
                target = feature_corner(target, feature_dim, self.width, height, width)
                source = feature_corner(source, feature_dim, other.width, height, width)
            target.copy_(source)
        self.position.copy_(other.position - shift)
        self.first_position.copy_(other.first_position[rows] - shift)

    def refresh_arm(self, arm: Optional[FoldedARM]) -> None:
        """This state's folded ARM := arm's values, in place (CUDA graphs read it by address),
        and the kernels' weights prepared from it again: a kept state never steps with weights
        from before its search started, however they were changed (`.data`, inference tensors)."""
        if self.arm is None:
            return
        for mine, new in zip(self.arm[:4], arm[:4]):
            mine.copy_(new)
        refresh_prepared_weights(self.arm)

    def skip_slots(self, skipped: Tensor) -> None:
        """The cross-attention step skips the rows of slots where skipped [slots] is True (a
        finished search's): their outputs are 0, their coverage stays."""
        self.image_index.copy_(self.slot_of_row.masked_fill(skipped.repeat_interleave(self.group), -1))

    def append(self, tokens: Tensor) -> None:
        """Add one token to every row: tokens [rows]. The caller keeps within max_len."""
        self.position += 1
        self.tokens.index_copy_(1, self.position.view(1), tokens.view(-1, 1))

    def reorder(self, parents: Tensor, window: int) -> None:
        """New row r continues old row parents[r]: one gather per state tensor (of the self
        K/V, the window's positions only: past them, a swapped-in spare holds finite stale
        values, which a step writes before it reads them, or reads masked)."""
        for name, spare in self.spares.items():
            current = getattr(self, name)
            source, target = current, spare
            row_dim, position_dim = self.REORDERED[name]
            if position_dim is not None:
                source, target = source.narrow(position_dim, 0, window), target.narrow(position_dim, 0, window)
            torch.index_select(source, row_dim, parents, out=target)
            if self.fixed_addresses:
                source.copy_(target)
            else:
                setattr(self, name, spare)
                self.spares[name] = current

    def step(self, window: int) -> Tensor:
        """The decoder's logits for the newest token of every row: [rows, vocab]. Each layer is
        three ops, which run fused on the kernel backends: the self-attention block (and the
        cross-attention's query), the cross-attention step with the ARM, the layer's tail."""
        decoder, position, plan = self.decoder, self.position.view(1), self.plan
        newest = self.tokens.index_select(1, position).view(-1)
        encoding = decoder.pos_enc.pe.index_select(0, self.position - self.first_position)
        x = decoder.norm(decoder.word_embed(newest) + encoding)
        returned = None  # the attention the previous layer returned at this step
        for j, layer in enumerate(decoder.model.layers):
            x, q = self_attention_step_op(x, layer, self.self_keys[j], self.self_values[j], self.tokens,
                                          self.position, window, backend=plan["self_attention_step"])
            coverage = None if self.coverage is None or j == 0 else self.coverage[j - 1]
            k, v = self.memory_kv[j]
            out, returned = cross_attention_step_op(
                q.view(self.rows, self.nhead, -1), k, v, self.memory_mask, self.image_index,
                self.height, self.arm, coverage, returned, backend=plan["cross_attention_step"],
                rows_per_image=self.group,
                index_checked=True,  # built by skip_slots: each row reads its slot's image, or -1
            )
            x = feed_forward_step_op(x, out.reshape(self.rows, -1), layer, backend=plan["feed_forward_step"])
        return decoder.proj(x)
