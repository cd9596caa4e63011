"""The incremental decoder: one step of CoMER's decoder for the newest token of every
row, over static buffers allocated once.

Rows are grouped in slots of `group` rows that read one image (for the beam search, a
slot is one search: the beams of one image in one direction). Per decoder layer the state holds
- the cross-attention K/V of each slot's image, computed once and shared by its rows;
- the self-attention K/V of every row for the steps so far, preallocated to max_len;
- the ARM coverage running sums of every row (see ops/decode_step/reference.py),
so a step costs O(L) per row for the cross-attention and the ARM, whatever the prefix.

Shapes never change and the step counter lives on the device, so a step has no host
sync and can be captured in a CUDA graph. The only Python-side argument of a step is its
window: how many prefix positions the self-attention reads and a reorder copies, any
value from the prefix length up to max_len (positions past the prefix hold PAD tokens,
which the self-attention masks); `prefix_window` rounds it up so that few graphs serve
all lengths.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.arm import AttentionRefinementModule, FoldedARM
from ..ops.decode_step import coverage_dtype, fused_cross_attention_step
from ..ops.feed_forward_step import feed_forward_step
from ..ops.self_attention_step import self_attention_step
from ..tensor_cache import DerivedCache
from ..vocab import PAD_IDX

# Prefix windows are multiples of this: at most WINDOW_STEP - 1 wasted positions per step,
# and max_len / WINDOW_STEP windows (CUDA graphs) per state.
WINDOW_STEP = 32

_folded_arms = DerivedCache()


def folded_arm(arm: Optional[AttentionRefinementModule]) -> Optional[FoldedARM]:
    """arm.fold(), computed once per model; folded again only when the ARM's weights change."""
    if arm is None:
        return None

    def fold() -> FoldedARM:
        with torch.no_grad():
            return arm.fold()
    return _folded_arms.get(arm, (*arm.parameters(), *arm.buffers()), fold)


def prefix_window(length: int, max_len: int) -> int:
    """The window of a step whose rows hold `length` tokens."""
    return min(max_len, -(-length // WINDOW_STEP) * WINDOW_STEP)


def split_heads(x: Tensor, nhead: int) -> Tensor:
    """[b, L, d] -> [b, nhead, L, head_dim]."""
    b, L, d = x.shape
    return x.view(b, L, nhead, d // nhead).transpose(1, 2)


class DecodingState:
    def __init__(self, decoder, slots: int, group: int, height: int, width: int, max_len: int,
                 dtype: torch.dtype, device, backend: str):
        """Buffers for `slots` slots of `group` rows, each reading one image of h x w features, up to max_len
        tokens per row. backend: the resolved backend of the cross-attention step, 'torch',
        'triton' or 'cuda' (`fastcomer.backends.resolve`)."""
        layers = decoder.model.layers
        d = decoder.proj.in_features
        self.decoder = decoder
        self.arm = folded_arm(decoder.model.arm)
        self.nhead = decoder.nhead
        self.slots, self.group, self.rows = slots, group, slots * group
        self.height, self.length = height, height * width
        self.max_len = max_len
        head_dim = d // self.nhead
        like = torch.empty(0, dtype=dtype, device=device)
        self.backend = backend
        self.memory_kv = like.new_zeros(len(layers), 2, slots, self.nhead, self.length, head_dim)
        self.memory_mask = torch.ones(slots, self.length, dtype=torch.bool, device=device)
        self.slot_of_row = torch.arange(slots, dtype=torch.int32, device=device).repeat_interleave(group)
        self.image_index = self.slot_of_row.clone()  # what the fused kernels read: -1 skips a row
        # One tensor per kind of row state, rows first, so that a reorder is one gather each.
        # Zeros, not garbage: the self-attention's masked positions multiply V by weight 0.
        self.self_kv = like.new_zeros(self.rows, len(layers), 2, self.nhead, max_len, head_dim)
        # Layer j > 0 refines with coverage[:, j - 1]; layer 0 has none.
        channels = self.arm.coverage.channels(self.nhead) if self.arm else 0
        self.coverage = (like.new_zeros(self.rows, len(layers) - 1, channels, self.length,
                                        dtype=coverage_dtype(backend, dtype)) if self.arm else None)
        self.tokens = torch.full((self.rows, max_len), PAD_IDX, dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)  # index of the newest token

    def start(self, feature: Tensor, feature_mask: Tensor, tokens: Tensor) -> None:
        """A new search: feature [slots, h, w, d] and feature_mask [slots, h, w] are the
        slots' images; tokens [rows] are the rows' first tokens. In place."""
        if feature.shape[:3] != (self.slots, self.height, self.length // self.height):
            raise ValueError(f"feature must be [{self.slots}, {self.height}, {self.length // self.height}, d], "
                             f"got {tuple(feature.shape)}")
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

    def take(self, other: "DecodingState", slots: Tensor) -> None:
        """Slot i := other's slot slots[i], image, rows and caches (a smaller state continuing
        some of other's searches). In place."""
        rows = (slots[:, None] * self.group + torch.arange(self.group, device=slots.device)).view(-1)
        self.memory_kv.copy_(other.memory_kv[:, :, slots])
        self.memory_mask.copy_(other.memory_mask[slots])
        self.self_kv.copy_(other.self_kv[rows])
        if self.coverage is not None:
            self.coverage.copy_(other.coverage[rows])
        self.tokens.copy_(other.tokens[rows])
        self.position.copy_(other.position)

    def skip_slots(self, skipped: Tensor) -> None:
        """The cross-attention step skips the rows of slots where skipped [slots] is True (a
        finished search's): their outputs are 0, their coverage stays."""
        self.image_index.copy_(self.slot_of_row.masked_fill(skipped.repeat_interleave(self.group), -1))

    def append(self, tokens: Tensor) -> None:
        """Add one token to every row: tokens [rows]. The caller keeps within max_len."""
        self.position += 1
        self.tokens.index_copy_(1, self.position.view(1), tokens.view(-1, 1))

    def reorder(self, parents: Tensor, window: int) -> None:
        """New row r continues old row parents[r]: one gather per state tensor."""
        self.tokens.copy_(self.tokens[parents])
        self.self_kv[..., :window, :] = self.self_kv[parents, ..., :window, :]
        if self.coverage is not None:
            self.coverage.copy_(self.coverage[parents])

    def step(self, window: int) -> Tensor:
        """The decoder's logits for the newest token of every row: [rows, vocab]."""
        decoder, position = self.decoder, self.position.view(1)
        newest = self.tokens.index_select(1, position).view(-1)
        x = decoder.norm(decoder.word_embed(newest) + decoder.pos_enc.pe.index_select(0, position))
        pad = self.tokens[:, :window] == PAD_IDX if self.backend == "torch" else None
        returned = None  # the attention the previous layer returned at this step
        for j, layer in enumerate(decoder.model.layers):
            if self.backend == "torch":
                x = layer.norm1(x + self.self_attention(layer.self_attn, j, x, pad, window))
                q = layer.multihead_attn.project_query(x)
            else:  # one fused launch for the block and the query projection
                x, q = self_attention_step(x, layer, self.self_kv[:, j], self.tokens, self.position, window,
                                           backend=self.backend)
            coverage = None if self.coverage is None or j == 0 else self.coverage[:, j - 1]
            k, v = self.memory_kv[j]
            out, returned = fused_cross_attention_step(
                q.view(self.rows, self.nhead, -1), k, v, self.memory_mask, self.image_index,
                self.height, self.arm, coverage, returned, backend=self.backend, rows_per_image=self.group,
            )
            if self.backend == "torch":
                x = layer.norm2(x + layer.multihead_attn.out_proj(out.reshape(self.rows, -1)))
                x = layer.feed_forward(x)
            else:  # one fused launch for the out projection, norm2 and the feed-forward block
                x = feed_forward_step(x, out.view(self.rows, -1), layer, backend=self.backend)
        return decoder.proj(x)

    def self_attention(self, attn, layer: int, x: Tensor, pad: Tensor, window: int) -> Tensor:
        """Causal self-attention of the newest position over the cached ones: x [rows, d]."""
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(self.rows, 3, self.nhead, -1)
        cache = self.self_kv[:, layer]  # [rows, k/v, nhead, max_len, head_dim]
        cache.index_copy_(3, self.position.view(1), qkv[:, 1:, :, None])
        k, v = cache[:, :, :, :window].unbind(1)
        scores = torch.matmul((qkv[:, 0] * attn.head_dim**-0.5)[:, :, None], k.transpose(2, 3))
        weights = torch.softmax(scores.masked_fill(pad[:, None, None], float("-inf")), dim=-1)
        out = torch.matmul(weights, v)  # [rows, nhead, 1, head_dim]
        return attn.out_proj(out.view(self.rows, -1))
