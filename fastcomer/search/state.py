"""The incremental decoder: one step of CoMER's decoder for the newest token of every
live row, over a cache allocated once per search.

Rows are grouped by image: the live images' rows lie side by side, `group` rows each
(e.g. both directions' beams of one image). Per decoder layer the state holds
- the cross-attention K/V of each live image, computed once and shared by its rows;
- self-attention K/V of every row for the steps so far, preallocated to max_len;
- the ARM coverage running sums of every row (see ops/decode_step.py),
so a step costs O(L) per row for the cross-attention and the ARM, whatever the prefix.
"""
import weakref
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.arm import AttentionRefinementModule, FoldedARM
from ..ops.decode_step import cross_attention_step
from ..vocab import PAD_IDX

_folded_arms: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def folded_arm(arm: Optional[AttentionRefinementModule]) -> Optional[FoldedARM]:
    """arm.fold(), computed once per model; folded again only when the ARM's weights change."""
    if arm is None:
        return None
    version = tuple((t.data_ptr(), t._version) for t in (*arm.parameters(), *arm.buffers()))
    cached = _folded_arms.get(arm)
    if cached is None or cached[0] != version:
        with torch.no_grad():
            cached = (version, arm.fold())
        _folded_arms[arm] = cached
    return cached[1]


def split_heads(x: Tensor, nhead: int) -> Tensor:
    """[b, L, d] -> [b, nhead, L, head_dim]."""
    b, L, d = x.shape
    return x.view(b, L, nhead, d // nhead).transpose(1, 2).contiguous()


class DecodingState:
    def __init__(self, decoder, feature: Tensor, feature_mask: Tensor, group: int, max_rows_per_image: int, max_len: int):
        """feature [b, h, w, d], feature_mask [b, h, w]; rows start as `group` per image
        and may grow to max_rows_per_image; sequences hold up to max_len tokens."""
        b, h, w, d = feature.shape
        layers = decoder.model.layers
        self.decoder = decoder
        self.arm = folded_arm(decoder.model.arm)
        self.nhead = decoder.nhead
        self.height = h
        memory = feature.reshape(b, h * w, d)
        self.memory_mask = feature_mask.reshape(b, h * w)
        self.memory_kv = [
            tuple(split_heads(x, self.nhead) for x in layer.multihead_attn.project_key_value(memory)) for layer in layers
        ]
        capacity = b * max_rows_per_image
        head_dim = d // self.nhead
        self.self_k = [feature.new_empty(capacity, self.nhead, max_len, head_dim) for _ in layers]
        self.self_v = [feature.new_empty(capacity, self.nhead, max_len, head_dim) for _ in layers]
        # Layer j > 0 refines with coverage[j]; layer 0 only feeds coverage[1].
        channels = self.nhead * (int(self.arm.cross_coverage) + int(self.arm.self_coverage)) if self.arm else 0
        self.coverage: List[Optional[Tensor]] = [None] + [
            feature.new_zeros(capacity, channels, h * w) if self.arm else None for _ in layers[1:]
        ]
        self.tokens = torch.full((capacity, max_len), PAD_IDX, dtype=torch.long, device=feature.device)
        self.images = b
        self.group = group
        self.length = 0  # tokens per row so far

    @property
    def rows(self) -> int:
        return self.images * self.group

    def append(self, tokens: Tensor) -> None:
        """Add one token to every live row: tokens [rows]."""
        if self.length == self.tokens.shape[1]:
            raise RuntimeError(f"the decoding state holds at most {self.length} tokens per row")
        self.tokens[: self.rows, self.length] = tokens
        self.length += 1

    def reorder(self, parents: Tensor, group: int, images: Optional[Tensor] = None) -> None:
        """New rows, `group` per image: new row r continues old row parents[r]. With
        `images` (positions among the live images, ascending), only those images stay live;
        parents must then lie in their rows."""
        images_after = self.images if images is None else len(images)
        if len(parents) != images_after * group:
            raise ValueError(f"reorder got {len(parents)} rows for {images_after} images of {group}")
        t = self.length
        self.tokens[: len(parents), :t] = self.tokens[parents, :t]
        for cache in (*self.self_k, *self.self_v):
            cache[: len(parents), :, :t] = cache[parents, :, :t]
        for coverage in self.coverage[1:]:
            if coverage is not None:
                coverage[: len(parents)] = coverage[parents]
        if images is not None:
            self.memory_mask = self.memory_mask[images]
            self.memory_kv = [(k[images], v[images]) for k, v in self.memory_kv]
            self.images = len(images)
        self.group = group

    def step(self) -> Tensor:
        """The decoder's logits for the newest token of every live row: [rows, vocab]."""
        decoder, rows, t = self.decoder, self.rows, self.length - 1
        x = decoder.norm(decoder.word_embed(self.tokens[:rows, t]) + decoder.pos_enc.pe[t])
        pad = self.tokens[:rows, : t + 1] == PAD_IDX
        returned = None  # the attention the previous layer returned at this step
        for j, layer in enumerate(decoder.model.layers):
            x = layer.norm1(x + self.self_attention(layer.self_attn, j, x, pad))
            q = layer.multihead_attn.project_query(x).view(self.images, self.group, self.nhead, -1)
            k, v = self.memory_kv[j]
            coverage = None if self.coverage[j] is None else self.coverage[j][:rows]
            out, returned = cross_attention_step(q, k, v, self.memory_mask, self.height, self.arm, coverage, returned)
            x = layer.norm2(x + layer.multihead_attn.out_proj(out.reshape(rows, -1)))
            x = layer.feed_forward(x)
        return decoder.proj(x)

    def self_attention(self, attn, layer: int, x: Tensor, pad: Tensor) -> Tensor:
        """Causal self-attention of the newest position over the cached ones: x [rows, d]."""
        rows, t, d = self.rows, self.length - 1, x.shape[1]
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(rows, 3, self.nhead, -1).unbind(1)
        cache_k, cache_v = self.self_k[layer], self.self_v[layer]
        cache_k[:rows, :, t] = k
        cache_v[:rows, :, t] = v
        scores = torch.matmul((q * attn.head_dim**-0.5)[:, :, None], cache_k[:rows, :, : t + 1].transpose(2, 3))
        weights = torch.softmax(scores.masked_fill(pad[:, None, None], float("-inf")), dim=-1)
        out = torch.matmul(weights, cache_v[:rows, :, : t + 1])  # [rows, nhead, 1, head_dim]
        return attn.out_proj(out.view(rows, d))
