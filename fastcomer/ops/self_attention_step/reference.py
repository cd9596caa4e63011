"""The self-attention block of one decode step in plain PyTorch: the reference of the kernel."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...vocab import PAD_IDX


def reference_step(x: Tensor, layer, cache: Tensor, tokens: Tensor, position: Tensor,
                   window: int) -> Tuple[Tensor, Tensor]:
    """See `fastcomer.ops.self_attention_step.self_attention_step`."""
    attn = layer.self_attn
    rows, nhead = x.shape[0], attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(rows, 3, nhead, -1)
    cache.index_copy_(3, position.view(1), qkv[:, 1:, :, None])
    k, v = cache[:, :, :, :window].unbind(1)
    scores = torch.matmul((qkv[:, 0] * attn.head_dim**-0.5)[:, :, None], k.transpose(2, 3))
    pad = tokens[:, :window] == PAD_IDX
    weights = torch.softmax(scores.masked_fill(pad[:, None, None], float("-inf")), dim=-1)
    out = torch.matmul(weights, v).view(rows, -1)
    x = layer.norm1(x + attn.out_proj(out))
    return x, layer.multihead_attn.project_query(x)
