"""Multi-head attention with CoMER's refinement hook, batch-first, in plain PyTorch.

Parameters use the `nn.MultiheadAttention` layout (`in_proj_weight` [3d, d],
`in_proj_bias`, `out_proj`), so CoMER's checkpoints load unchanged.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def masked_softmax(scores: Tensor, key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], nhead: int) -> Tensor:
    """softmax over the last axis of scores [(b nhead), t, L] with -inf at masked keys.

    key_padding_mask [b, L] and attn_mask [t, L] are bool, True = excluded.
    """
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    if key_padding_mask is not None:
        bn, t, L = scores.shape
        scores = scores.view(bn // nhead, nhead, t, L).masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        scores = scores.view(bn, t, L)
    return F.softmax(scores, dim=-1)


class MultiheadAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def project_query(self, query: Tensor) -> Tensor:
        """[b, t, d] -> scaled q [b, t, d] (the scaling follows the projection, bias included)."""
        d = self.embed_dim
        return F.linear(query, self.in_proj_weight[:d], self.in_proj_bias[:d]) * self.head_dim**-0.5

    def project_key_value(self, memory: Tensor) -> Tuple[Tensor, Tensor]:
        """[b, L, d] -> k, v [b, L, d]."""
        d = self.embed_dim
        return F.linear(memory, self.in_proj_weight[d:], self.in_proj_bias[d:]).chunk(2, dim=-1)

    def split_heads(self, x: Tensor) -> Tensor:
        """[b, t, d] -> [(b nhead), t, head_dim]."""
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2).reshape(b * self.num_heads, t, self.head_dim)

    def merge_heads(self, x: Tensor) -> Tensor:
        """[(b nhead), t, head_dim] -> [b, t, d]."""
        bn, t, _ = x.shape
        return x.view(bn // self.num_heads, self.num_heads, t, self.head_dim).transpose(1, 2).reshape(-1, t, self.embed_dim)

    def forward(
        self,
        query: Tensor,
        memory: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        arm: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> Tuple[Tensor, Tensor]:
        """query [b, t, d], memory [b, L, d] (pass query itself for self-attention).

        With `arm`, a function of this layer's attention returning R, the scores are
        refined to S - R and normalised again. Returns the projected output [b, t, d]
        and the attention used for it, [(b nhead), t, L] (after dropout, as CoMER returns it).
        """
        q = self.split_heads(self.project_query(query))
        k, v = (self.split_heads(x) for x in self.project_key_value(memory))
        scores = torch.bmm(q, k.transpose(1, 2))
        attn = F.dropout(masked_softmax(scores, key_padding_mask, attn_mask, self.num_heads), self.dropout, self.training)
        if arm is not None:
            refined = masked_softmax(scores - arm(attn), key_padding_mask, attn_mask, self.num_heads)
            attn = F.dropout(refined, self.dropout, self.training)
        out = self.merge_heads(torch.bmm(attn, v))
        return self.out_proj(out), attn
