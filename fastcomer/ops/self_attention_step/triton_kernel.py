"""The self-attention block of one decode step as one Triton kernel: one program per row.

Head by head, the program projects its row's q, k and v (GEMVs over d, in chunks), writes k and v to
the cache at the newest position, attends over the window (the newest k and v are taken
from registers, not read back), and accumulates the out projection; then residual,
LayerNorm (norm1), and the cross-attention's query projection of the result.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...vocab import PAD_IDX
from ..triton_launch import launch_kernel


@triton.jit
def _gemv(w_ptr, b_ptr, first, vector_ptr, d, outs, out_ok, BLOCK_C: tl.constexpr):
    """W[first + outs] . vector + b[first + outs] in float32, over d in chunks of BLOCK_C (the
    vector read from memory chunk by chunk): a [outs, BLOCK_C] weight tile in registers."""
    chunk = tl.arange(0, BLOCK_C)
    acc = tl.zeros(outs.shape, tl.float32)
    for start in range(0, d, BLOCK_C):
        col = start + chunk
        vector = tl.load(vector_ptr + col, mask=col < d, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + (first + outs)[:, None] * d + col[None, :], mask=out_ok[:, None] & (col < d)[None, :],
                    other=0.0)
        acc += tl.sum(w.to(tl.float32) * vector[None, :], axis=1)
    return acc + tl.load(b_ptr + first + outs, mask=out_ok, other=0.0).to(tl.float32)


@triton.jit
def _self_attention_step_kernel(
    x_ptr, in_weight_ptr, in_bias_ptr, out_weight_ptr, out_bias_ptr, norm_weight_ptr, norm_bias_ptr,
    query_weight_ptr, query_bias_ptr, keys_ptr, values_ptr, tokens_ptr, position_ptr, x_out_ptr, query_out_ptr,
    d, nhead, head_dim, window, eps, scale, pad_idx,
    stride_k_row, stride_k_head, stride_k_pos, stride_k_dim,
    stride_v_row, stride_v_head, stride_v_pos, stride_v_dim, stride_tokens_row,
    BLOCK_D: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    dims = tl.arange(0, BLOCK_HD)
    dim_ok = dims < head_dim
    pos = tl.arange(0, BLOCK_W)
    position = tl.load(position_ptr)
    dtype = x_out_ptr.dtype.element_ty
    x_row, x_out_row = x_ptr + row * d, x_out_ptr + row * d
    tokens = tl.load(tokens_ptr + row * stride_tokens_row + pos, mask=pos < window, other=pad_idx)
    attend = (tokens != pad_idx) & (pos < window)
    cached = attend & (pos != position)  # the newest k, v come from registers
    newest = (pos == position)[:, None]
    attn_out = tl.zeros((BLOCK_D,), tl.float32)
    for h in range(0, nhead):
        first = h * head_dim
        q = _gemv(in_weight_ptr, in_bias_ptr, first, x_row, d, dims, dim_ok, BLOCK_C).to(dtype).to(tl.float32)
        k = _gemv(in_weight_ptr, in_bias_ptr, d + first, x_row, d, dims, dim_ok, BLOCK_C).to(dtype)
        v = _gemv(in_weight_ptr, in_bias_ptr, 2 * d + first, x_row, d, dims, dim_ok, BLOCK_C).to(dtype)
        k_head = keys_ptr + row * stride_k_row + h * stride_k_head
        v_head = values_ptr + row * stride_v_row + h * stride_v_head
        tl.store(k_head + position * stride_k_pos + dims * stride_k_dim, k, mask=dim_ok)
        tl.store(v_head + position * stride_v_pos + dims * stride_v_dim, v, mask=dim_ok)
        ok = cached[:, None] & dim_ok[None, :]
        k_at = k_head + pos[:, None] * stride_k_pos + dims[None, :] * stride_k_dim
        v_at = v_head + pos[:, None] * stride_v_pos + dims[None, :] * stride_v_dim
        keys = tl.where(newest, k[None, :], tl.load(k_at, mask=ok, other=0.0)).to(tl.float32)
        values = tl.where(newest, v[None, :], tl.load(v_at, mask=ok, other=0.0))
        scores = tl.sum(keys * (q * scale).to(dtype).to(tl.float32)[None, :], axis=1)
        scores = tl.where(attend, scores, float("-inf"))
        weights = tl.exp(scores - tl.max(scores))
        weights = weights / tl.sum(weights)
        out = tl.sum(weights[:, None] * values.to(tl.float32), axis=0).to(dtype).to(tl.float32)
        w_out = tl.load(out_weight_ptr + cols[:, None] * d + first + dims[None, :],
                        mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        attn_out += tl.sum(w_out.to(tl.float32) * out[None, :], axis=1)
    attn_out = (attn_out + tl.load(out_bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)).to(dtype)
    y = tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32) + attn_out.to(tl.float32)
    mean = tl.sum(y, axis=0) / d
    centred = tl.where(col_ok, y - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / d + eps)
    norm_weight = tl.load(norm_weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    norm_bias = tl.load(norm_bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    x_out = (centred * rstd * norm_weight + norm_bias).to(dtype)
    tl.store(x_out_row + cols, x_out, mask=col_ok)
    tl.debug_barrier()  # the query projection reads x_out back, written by other threads
    # The cross-attention's query: the first d rows of its in_proj, then the scaling.
    for h in range(0, nhead):
        outs = h * head_dim + dims
        query = _gemv(query_weight_ptr, query_bias_ptr, h * head_dim, x_out_row, d, dims, dim_ok, BLOCK_C)
        tl.store(query_out_ptr + row * d + outs, (query.to(dtype).to(tl.float32) * scale).to(dtype), mask=dim_ok)


def self_attention_step(x: Tensor, layer, keys: Tensor, values: Tensor, tokens: Tensor, position: Tensor,
                        window: int, num_warps: int = 8) -> Tuple[Tensor, Tensor]:
    """Launches the kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); see
    `fastcomer.ops.self_attention_step.self_attention_step`."""
    attn, cross = layer.self_attn, layer.multihead_attn
    rows, d = x.shape
    nhead, head_dim = attn.num_heads, attn.head_dim
    max_len = tokens.shape[1]
    if keys.shape != (rows, nhead, head_dim, max_len) or values.shape != (rows, nhead, max_len, head_dim):
        raise ValueError(f"self-attention step: keys must be [{rows}, {nhead}, {head_dim}, {max_len}] and values "
                         f"[{rows}, {nhead}, {max_len}, {head_dim}], got {tuple(keys.shape)} and {tuple(values.shape)}")
    if not 0 < window <= tokens.shape[1] or tokens.stride(1) != 1:
        raise ValueError(f"self-attention step: window must be in 1..{tokens.shape[1]} and tokens need a unit "
                         f"last stride, got window {window}")
    if cross.num_heads != nhead or layer.norm1.normalized_shape != (d,):
        raise ValueError("self-attention step: the layer's attentions and norm1 must match x's width")
    x = x.contiguous()
    x_out, query = torch.empty_like(x), torch.empty_like(x)
    # the kernel reads the weights as contiguous rows (a no-op for the usual parameters)
    weights = [t.contiguous() for t in (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight,
                                        attn.out_proj.bias, layer.norm1.weight, layer.norm1.bias,
                                        cross.in_proj_weight, cross.in_proj_bias)]
    launch_kernel(_self_attention_step_kernel, (rows,),
        x, *weights, keys, values, tokens, position,
        x_out, query, d, nhead, head_dim, window, layer.norm1.eps, head_dim**-0.5, PAD_IDX,
        keys.stride(0), keys.stride(1), keys.stride(3), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), values.stride(3), tokens.stride(0),
        BLOCK_D=triton.next_power_of_2(d), BLOCK_HD=triton.next_power_of_2(head_dim),
        BLOCK_W=triton.next_power_of_2(window), BLOCK_C=min(32, triton.next_power_of_2(d)), num_warps=num_warps,
    )
    return x_out, query
