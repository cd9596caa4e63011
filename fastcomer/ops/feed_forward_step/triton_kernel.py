"""The layer's tail of one decode step as one Triton kernel: one program per row. GEMVs, chunk
by chunk so that a weight tile is [d, BLOCK_F] (no spills at d = 256): the out projection,
residual and LayerNorm, then the feed-forward block (linear1 + ReLU of a chunk of its hidden
units feeds that chunk's share of linear2 at once), residual and LayerNorm."""
import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_launch import launch_kernel


@triton.jit
def _layer_norm(y, col_ok, d, weight_ptr, bias_ptr, cols, eps):
    mean = tl.sum(y, axis=0) / d
    centred = tl.where(col_ok, y - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / d + eps)
    weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return centred * rstd * weight + bias


@triton.jit
def _feed_forward_step_kernel(
    x_ptr, attended_ptr, out_weight_ptr, out_bias_ptr, norm2_weight_ptr, norm2_bias_ptr,
    linear1_weight_ptr, linear1_bias_ptr, linear2_weight_ptr, linear2_bias_ptr, norm3_weight_ptr, norm3_bias_ptr,
    x_out_ptr, d, hidden, eps2, eps3,
    BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dtype = x_out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    outs = tl.arange(0, BLOCK_D)  # the same lanes as output features
    units = tl.arange(0, BLOCK_F)
    x = tl.load(x_ptr + row * d + cols, mask=col_ok, other=0.0).to(tl.float32)
    # out projection, BLOCK_F input features at a time: a [d, BLOCK_F] weight tile in registers
    projected = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, d, BLOCK_F):
        col = start + units
        attended = tl.load(attended_ptr + row * d + col, mask=col < d, other=0.0).to(tl.float32)
        w_out = tl.load(out_weight_ptr + outs[:, None] * d + col[None, :], mask=col_ok[:, None] & (col < d)[None, :],
                        other=0.0).to(tl.float32)
        projected += tl.sum(w_out * attended[None, :], axis=1)
    projected = (projected + tl.load(out_bias_ptr + outs, mask=col_ok, other=0.0).to(tl.float32)).to(dtype)
    y = _layer_norm(x + projected.to(tl.float32), col_ok, d, norm2_weight_ptr, norm2_bias_ptr, cols, eps2)
    y = y.to(dtype).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(0, hidden, BLOCK_F):
        unit = start + units
        unit_ok = unit < hidden
        w1 = tl.load(linear1_weight_ptr + unit[:, None] * d + cols[None, :], mask=unit_ok[:, None] & col_ok[None, :],
                     other=0.0).to(tl.float32)
        h = tl.sum(w1 * y[None, :], axis=1) + tl.load(linear1_bias_ptr + unit, mask=unit_ok, other=0.0).to(tl.float32)
        h = tl.maximum(h.to(dtype).to(tl.float32), 0.0)
        w2 = tl.load(linear2_weight_ptr + outs[:, None] * hidden + unit[None, :],
                     mask=col_ok[:, None] & unit_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w2 * h[None, :], axis=1)
    ffn = (acc + tl.load(linear2_bias_ptr + outs, mask=col_ok, other=0.0).to(tl.float32)).to(dtype)
    z = _layer_norm(y + ffn.to(tl.float32), col_ok, d, norm3_weight_ptr, norm3_bias_ptr, cols, eps3)
    tl.store(x_out_ptr + row * d + cols, z.to(dtype), mask=col_ok)


def feed_forward_step(x: Tensor, attended: Tensor, layer, block_f: int = 32, num_warps: int = 8) -> Tensor:
    """Launches the kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); see
    `fastcomer.ops.feed_forward_step.feed_forward_step`."""
    rows, d = x.shape
    if attended.shape != (rows, d):
        raise ValueError(f"feed-forward step: attended must be [{rows}, {d}], got {tuple(attended.shape)}")
    hidden = layer.linear1.out_features
    x, attended = x.contiguous(), attended.contiguous()
    x_out = torch.empty_like(x)
    # the kernel reads the weights as contiguous rows (a no-op for the usual parameters)
    weights = [t.contiguous() for t in (layer.multihead_attn.out_proj.weight, layer.multihead_attn.out_proj.bias,
                                        layer.norm2.weight, layer.norm2.bias, layer.linear1.weight,
                                        layer.linear1.bias, layer.linear2.weight, layer.linear2.bias,
                                        layer.norm3.weight, layer.norm3.bias)]
    launch_kernel(_feed_forward_step_kernel, (rows,),
        x, attended, *weights,
        x_out, d, hidden, layer.norm2.eps, layer.norm3.eps,
        BLOCK_D=triton.next_power_of_2(d), BLOCK_F=min(block_f, triton.next_power_of_2(hidden)), num_warps=num_warps,
    )
    return x_out
