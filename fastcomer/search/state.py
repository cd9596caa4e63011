"""The incremental decoder: one step of CoMER's decoder for the newest token of every
live row, over a cache allocated once per search.

Rows are grouped by image, in segments: a segment is a list of images with the same
number of rows each (e.g. both directions' beams, or one direction's once the other is
done). Per decoder layer the state holds
- the cross-attention K/V of each image, computed once and shared by all its rows
  (a segment over a subset of the images holds its own copy, made when the layout changes);
- self-attention K/V of every row for the steps so far, preallocated to max_len;
- the ARM coverage running sums of every row (see ops/decode_step.py),
so a step costs O(L) per row for the cross-attention and the ARM, whatever the prefix.
"""
import weakref
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend as backends
from ..model.arm import AttentionRefinementModule, FoldedARM
from ..ops.decode_step import cross_attention_step
from ..ops.decode_step_dispatch import fused_cross_attention_step
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


class Segment(NamedTuple):
    images: List[int]  # ids among the search's images
    group: int  # rows per image
    memory_kv: List[Tuple[Tensor, Tensor]]  # per layer k, v [images, nhead, L, head_dim]
    memory_mask: Tensor  # [images, L], True = padding
    image_index: Tensor  # [rows]: each row's image within the segment, for the fused kernels

    @property
    def rows(self) -> int:
        return len(self.images) * self.group


class DecodingState:
    def __init__(self, decoder, feature: Tensor, feature_mask: Tensor, max_rows: int, max_len: int,
                 backend: Optional[str] = None):
        """feature [b, h, w, d], feature_mask [b, h, w]; at most max_rows rows of up to max_len tokens.
        backend runs the cross-attention step: 'torch' (the grouped reference step), 'triton' or
        'cuda' (the fused kernels), 'auto' (kernels for CUDA float32/16/bf16), None ($FASTCOMER_BACKEND)."""
        b, h, w, d = feature.shape
        self.kernel = backends.resolve(feature, backend, cuda_available=backends.cuda_extension_usable())
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
        head_dim = d // self.nhead
        # One tensor per kind of state, rows first, so that a reorder is one gather each.
        self.self_kv = feature.new_empty(max_rows, len(layers), 2, self.nhead, max_len, head_dim)
        # Layer j > 0 refines with coverage[:, j - 1]; layer 0 has none.
        channels = self.nhead * (int(self.arm.cross_coverage) + int(self.arm.self_coverage)) if self.arm else 0
        # The kernels keep the coverage sums in float32 whatever the model's dtype.
        coverage_dtype = feature.dtype if self.kernel == "torch" else torch.float32
        self.coverage = feature.new_zeros(max_rows, len(layers) - 1, channels, h * w, dtype=coverage_dtype) if self.arm else None
        self.tokens = torch.full((max_rows, max_len), PAD_IDX, dtype=torch.long, device=feature.device)
        self.segments: List[Segment] = []
        self.length = 0  # tokens per row so far

    @property
    def rows(self) -> int:
        return sum(segment.rows for segment in self.segments)

    def set_layout(self, layout: Sequence[Tuple[List[int], int]]) -> None:
        """Rows from now on: per (images, group) pair, a segment of `group` rows per image."""
        everyone = list(range(self.memory_mask.shape[0]))
        self.segments = []
        for images, group in layout:
            if images == everyone:
                kv, mask = self.memory_kv, self.memory_mask
            else:
                index = torch.tensor(images, device=self.memory_mask.device)
                kv, mask = [(k[index], v[index]) for k, v in self.memory_kv], self.memory_mask[index]
            image_index = torch.arange(len(images), dtype=torch.int32, device=mask.device).repeat_interleave(group)
            self.segments.append(Segment(list(images), group, kv, mask, image_index))
        if self.rows > self.tokens.shape[0]:
            raise ValueError(f"layout of {self.rows} rows exceeds the state's {self.tokens.shape[0]}")

    def append(self, tokens: Tensor) -> None:
        """Add one token to every live row: tokens [rows]."""
        if self.length == self.tokens.shape[1]:
            raise RuntimeError(f"the decoding state holds at most {self.length} tokens per row")
        self.tokens[: self.rows, self.length] = tokens
        self.length += 1

    def reorder(self, parents: Tensor, layout: Optional[Sequence[Tuple[List[int], int]]] = None) -> None:
        """New row r continues old row parents[r], in one gather per state tensor; with
        `layout`, the rows are laid out anew (see set_layout)."""
        if layout is not None:
            self.set_layout(layout)
        if len(parents) != self.rows:
            raise ValueError(f"reorder got {len(parents)} parents for {self.rows} rows")
        t, n = self.length, len(parents)
        self.tokens[:n, :t] = self.tokens[parents, :t]
        self.self_kv[:n, :, :, :, :t] = self.self_kv[parents, :, :, :, :t]
        if self.coverage is not None:
            self.coverage[:n] = self.coverage[parents]

    def step(self) -> Tensor:
        """The decoder's logits for the newest token of every live row: [rows, vocab]."""
        decoder, rows, t = self.decoder, self.rows, self.length - 1
        x = decoder.norm(decoder.word_embed(self.tokens[:rows, t]) + decoder.pos_enc.pe[t])
        pad = self.tokens[:rows, : t + 1] == PAD_IDX
        returned = None  # the attention the previous layer returned at this step
        for j, layer in enumerate(decoder.model.layers):
            x = layer.norm1(x + self.self_attention(layer.self_attn, j, x, pad))
            q = layer.multihead_attn.project_query(x)
            outs, returns, start = [], [], 0
            for segment in self.segments:
                rows_here = slice(start, start + segment.rows)
                coverage = None if self.coverage is None or j == 0 else self.coverage[rows_here, j - 1]
                prev_attn = None if returned is None else returned[rows_here]
                if self.kernel == "torch":
                    out, ret = cross_attention_step(
                        q[rows_here].view(len(segment.images), segment.group, self.nhead, -1),
                        *segment.memory_kv[j], segment.memory_mask, self.height, self.arm, coverage, prev_attn,
                    )
                else:
                    out, ret = fused_cross_attention_step(
                        q[rows_here].view(segment.rows, self.nhead, -1), *segment.memory_kv[j], segment.memory_mask,
                        segment.image_index, self.height, self.arm, coverage, prev_attn, backend=self.kernel,
                    )
                outs.append(out.reshape(segment.rows, -1))
                returns.append(ret)
                start += segment.rows
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            returned = returns[0] if len(returns) == 1 else torch.cat(returns)
            x = layer.norm2(x + layer.multihead_attn.out_proj(out))
            x = layer.feed_forward(x)
        return decoder.proj(x)

    def self_attention(self, attn, layer: int, x: Tensor, pad: Tensor) -> Tensor:
        """Causal self-attention of the newest position over the cached ones: x [rows, d]."""
        rows, t, d = self.rows, self.length - 1, x.shape[1]
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(rows, 3, self.nhead, -1)
        cache = self.self_kv[:rows, layer]  # [rows, k/v, nhead, max_len, head_dim]
        cache[:, :, :, t] = qkv[:, 1:]
        k, v = cache[:, :, :, : t + 1].unbind(1)
        scores = torch.matmul((qkv[:, 0] * attn.head_dim**-0.5)[:, :, None], k.transpose(2, 3))
        weights = torch.softmax(scores.masked_fill(pad[:, None, None], float("-inf")), dim=-1)
        out = torch.matmul(weights, v)  # [rows, nhead, 1, head_dim]
        return attn.out_proj(out.view(rows, d))
