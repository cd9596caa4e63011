"""The self-attention block of one decoding step in plain PyTorch: the torch backend and the
reference of the kernel."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...vocab import PAD_IDX


def self_attention_step(x: Tensor, layer, keys: Tensor, values: Tensor, tokens: Tensor, position: Tensor,
                        window: int) -> Tuple[Tensor, Tensor]:
    """See `fastcomer.ops.self_attention_step.self_attention_step`."""
    attn = layer.self_attn
    rows, nhead = x.shape[0], attn.num_heads
    # views, narrow and masked_fill_: the step's per-op costs are most of its time on a CPU
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(rows, 3, nhead, -1).unbind(1)
    keys.index_copy_(3, position.view(1), k.unsqueeze(3).to(keys.dtype))  # autocast: qkv may be half
    values.index_copy_(2, position.view(1), v.unsqueeze(2).to(values.dtype))
    # K is kept transposed, so that both matmuls read the caches in place
    scores = torch.matmul((q * attn.head_dim**-0.5).unsqueeze(2), keys.narrow(3, 0, window))
    pad = tokens.narrow(1, 0, window) == PAD_IDX
    weights = torch.softmax(scores.masked_fill_(pad.view(rows, 1, 1, window), float("-inf")), dim=-1)
    out = torch.matmul(weights, values.narrow(2, 0, window))  # [rows, nhead, 1, head_dim]
    x = layer.norm1(x + attn.out_proj(out.view(rows, -1)))
    return x, layer.multihead_attn.project_query(x)
