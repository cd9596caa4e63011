"""CoMER's image encoder: DenseNet-B, 1x1 feature projection, 2-D sine position
encoding, LayerNorm. Module and parameter names follow CoMER's checkpoints."""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .batch_norm import running_affine

# The feature map's stride in pixels: four stride-2 stages (conv, max pool, two transitions).
FEATURE_STRIDE = 16


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3 -> BN -> ReLU, concatenated to the input."""

    def __init__(self, in_channels: int, growth_rate: int, dropout: float = 0.2):
        super().__init__()
        inter = 4 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, inter, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, growth_rate, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(growth_rate)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(F.relu(self.bn1(self.conv1(x))))
        out = self.dropout(F.relu(self.bn2(self.conv2(out))))
        return torch.cat((x, out), dim=1)


def conv1x1(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """The 1x1 stride-1 convolution by weight [out, c, 1, 1] of x [b, c, h, w] as one GEMM over
    the channels, channels-last in and out. Why: single-threaded, torch runs a 1x1 convolution
    on its slow path, which first copies an input that is not contiguous; as a GEMM a channel
    prefix of a channels-last buffer is read where it lies (rows of a longer stride)."""
    b, c, h, w = x.shape
    out_channels = weight.shape[0]
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view when x is channels-last
    out = F.linear(rows, weight.view(out_channels, c), bias)
    return out.view(b, h, w, out_channels).permute(0, 3, 1, 2)


def _pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid") and conv.groups == 1


def _unit_dropout(unit: nn.Module, x: Tensor) -> Tensor:
    # the public code's units have a use_dropout flag; fastcomer's always have their dropout
    return unit.dropout(x) if getattr(unit, "use_dropout", True) else x


def _batch_norm(bn: nn.BatchNorm2d, x: Tensor, update_stats: bool) -> Tensor:
    if update_stats or not bn.training:
        return bn(x)
    # a recomputation in training: the same batch statistics, the running ones left as they are
    return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)


def conv_bn_relu(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor, update_stats: bool = True) -> Tensor:
    """relu(bn(conv(x))), a 1x1 stride-1 convolution as a GEMM (`conv1x1`). A BatchNorm with
    running statistics (eval mode) is folded into the convolution's weight and bias (afresh at
    each call: microseconds), so that the output is written once and the ReLU runs in place: on
    the CPU the BatchNorm passes and ReLU copies were about 8 of the encoder's 95 ms (128x512,
    1 thread); the modules are then not called (no hooks of theirs run). update_stats=False: a
    BatchNorm in training mode does not update its running statistics."""
    if bn.training or bn.running_mean is None:
        out = conv1x1(x, conv.weight, conv.bias) if _pointwise(conv) else conv(x)
        return F.relu(_batch_norm(bn, out, update_stats))
    scale, shift = running_affine(bn)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return (conv1x1(x, weight, bias) if _pointwise(conv) else conv._conv_forward(x, weight, bias)).relu_()


def bottleneck_branch(unit: nn.Module, x: Tensor, update_stats: bool = True) -> Tensor:
    """A Bottleneck's new channels [b, growth, h, w] from its input x (a channel prefix of the
    block's buffer): the unit's math (`conv_bn_relu`). update_stats=False: BatchNorm in
    training mode does not update its running statistics."""
    out = _unit_dropout(unit, conv_bn_relu(unit.conv1, unit.bn1, x, update_stats))
    return _unit_dropout(unit, conv_bn_relu(unit.conv2, unit.bn2, out, update_stats))


def is_bottleneck(unit: nn.Module) -> bool:
    """Whether unit has DenseNet-B's Bottleneck modules (fastcomer's or the public code's)."""
    return all(isinstance(getattr(unit, name, None), kind) for name, kind in
               (("conv1", nn.Conv2d), ("bn1", nn.BatchNorm2d), ("conv2", nn.Conv2d), ("bn2", nn.BatchNorm2d)))


def _fill_buffer(units: nn.Sequential, x: Tensor, rng_states: Optional[list] = None) -> Tensor:
    """The block's output: x and every unit's new channels in one channels-last buffer, each
    unit reading the channel prefix before it as a view. rng_states: a list that receives the
    random generator's state before each unit (to replay its dropout)."""
    b, c, h, w = x.shape
    total = c + sum(unit.conv2.out_channels for unit in units)
    # A unit's input, a channel prefix, is a GEMM operand of a longer row stride, and torch's CPU
    # bfloat16 GEMM reads the element past a row of odd width (times 0): a NaN or inf left there
    # in reused memory would make the block's output NaN. So in half precision the buffer starts
    # as zeros; float32 and float64 GEMMs read no unwritten memory (tests/model/test_dense_block.py
    # poisons it), and zeroing it cost 2.5 of the float32 encoder's 90 ms (128x512, 1 thread).
    allocate = x.new_zeros if x.element_size() < 4 else x.new_empty
    buffer = allocate(b, h, w, total).permute(0, 3, 1, 2)
    buffer[:, :c] = x
    for unit in units:
        if rng_states is not None:
            rng_states.append(_rng_state(x.device))
        grown = c + unit.conv2.out_channels
        buffer[:, c:grown] = bottleneck_branch(unit, buffer[:, :c])
        c = grown
    return buffer


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _dropout_active(units: nn.Sequential) -> bool:
    return any(unit.dropout.training and unit.dropout.p > 0 and getattr(unit, "use_dropout", True) for unit in units)


class _RecomputedBlock(torch.autograd.Function):
    """A dense block for autograd that keeps for backward only its output buffer (which the
    next layer keeps anyway): no unit's BatchNorm-ReLU outputs, no concatenations. Backward
    recomputes each unit from its prefix of the buffer (its dropout replayed from the random
    state saved before it), last unit first, accumulating the prefix's gradient in place
    (memory-efficient DenseNet, Pleiss et al. 2017)."""

    @staticmethod
    def forward(ctx, units: nn.Sequential, x: Tensor, *params: Tensor) -> Tensor:
        ctx.units, ctx.width = units, x.shape[1]
        ctx.rng_states = [] if _dropout_active(units) else None
        buffer = _fill_buffer(units, x, ctx.rng_states)
        ctx.save_for_backward(buffer)
        return buffer

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (buffer,) = ctx.saved_tensors
        units, device = ctx.units, buffer.device
        grad_buffer = torch.empty_like(buffer)  # channels-last, as the buffer
        grad_buffer.copy_(grad)
        param_grads = {}
        ends = [ctx.width]
        for unit in units:
            ends.append(ends[-1] + unit.conv2.out_channels)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=ctx.rng_states is not None):
            for i in reversed(range(len(units))):
                unit, c, grown = units[i], ends[i], ends[i + 1]
                if ctx.rng_states is not None:
                    _set_rng_state(device, ctx.rng_states[i])
                wanted = [p for p in unit.parameters() if p.requires_grad]
                with torch.enable_grad():
                    prefix = buffer[:, :c].detach().requires_grad_()
                    out = bottleneck_branch(unit, prefix, update_stats=False)
                    grads = torch.autograd.grad(out, [prefix, *wanted], grad_buffer[:, c:grown])
                grad_buffer[:, :c] += grads[0]
                param_grads.update(zip(map(id, wanted), grads[1:]))
        params = [p for unit in units for p in unit.parameters()]
        return (None, grad_buffer[:, :ctx.width], *(param_grads.get(id(p)) for p in params))


class DenseBlock(nn.Sequential):
    """Bottleneck units, each concatenating its new channels to its input, computed into one
    preallocated channels-last buffer of all the block's channels, each unit reading the
    prefix it needs as a view (no concatenation copies: those cost O(units^2) bytes). With
    autograd, backward recomputes the units instead of keeping their intermediate outputs
    (`_RecomputedBlock`); under a compiler or a tracer the plain units run. Same children and
    parameter names as an nn.Sequential of the units."""

    def forward(self, x: Tensor) -> Tensor:
        # A compiler plans the concatenations itself (the buffer's slice writes would be
        # scatters in its functional graph).
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return super().forward(x)
        params = [p for p in self.parameters()]
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return _RecomputedBlock.apply(self, x, *params)
        return _fill_buffer(self, x)


class Transition(nn.Module):
    """conv1x1 -> BN -> ReLU -> 2x2 average pool (ceil mode)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.2):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(conv_bn_relu(self.conv1, self.bn1, x))
        return F.avg_pool2d(out, 2, ceil_mode=True)


class DenseNet(nn.Module):
    def __init__(self, growth_rate: int, num_layers: int, reduction: float = 0.5):
        super().__init__()
        channels = 2 * growth_rate
        self.conv1 = nn.Conv2d(1, channels, kernel_size=7, padding=3, stride=2, bias=False)
        self.norm1 = nn.BatchNorm2d(channels)

        def dense_block(channels: int) -> DenseBlock:
            return DenseBlock(
                *(Bottleneck(channels + i * growth_rate, growth_rate) for i in range(num_layers))
            )

        self.dense1 = dense_block(channels)
        channels += num_layers * growth_rate
        out_channels = int(math.floor(channels * reduction))
        self.trans1 = Transition(channels, out_channels)
        channels = out_channels
        self.dense2 = dense_block(channels)
        channels += num_layers * growth_rate
        out_channels = int(math.floor(channels * reduction))
        self.trans2 = Transition(channels, out_channels)
        channels = out_channels
        self.dense3 = dense_block(channels)
        self.out_channels = channels + num_layers * growth_rate
        self.post_norm = nn.BatchNorm2d(self.out_channels)

    def forward(self, x: Tensor, x_mask: Tensor) -> Tuple[Tensor, Tensor]:
        out = conv_bn_relu(self.conv1, self.norm1, x)
        # Pooled channels-last, the layout of the first dense block's buffer: on the CPU torch's
        # max pool ran 14x faster so (48 channels of 64x256: 0.27 ms against 3.7 contiguous).
        out = F.max_pool2d(out.contiguous(memory_format=torch.channels_last), 2, ceil_mode=True)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.post_norm(self.dense3(out))
        # Each stride-2 stage keeps every second row and column of the mask.
        mask = x_mask[:, 0::FEATURE_STRIDE, 0::FEATURE_STRIDE]
        return out, mask


def image_position_encoding(mask: Tensor, d_model: int, temperature: float = 10000.0) -> Tensor:
    """2-D sine encoding over the unmasked region, [b, h, w, d_model], in float32.

    CoMER computes it in float32 whatever the model's dtype; so do we, so that a
    float64 model reproduces CoMER's float64 outputs to the last digits.
    """
    not_mask = ~mask
    scale = 2 * math.pi
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * scale
    half = d_model // 2
    dim_t = torch.arange(0, half, 2, dtype=torch.float32, device=mask.device)
    inv_freq = 1.0 / (temperature ** (dim_t / half))
    pos_x = x_embed[..., None] * inv_freq
    pos_y = y_embed[..., None] * inv_freq
    pos_x = torch.stack((pos_x.sin(), pos_x.cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y.sin(), pos_y.cos()), dim=4).flatten(3)
    return torch.cat((pos_x, pos_y), dim=3)


class Encoder(nn.Module):
    def __init__(self, d_model: int, growth_rate: int, num_layers: int):
        super().__init__()
        if d_model % 4:
            raise ValueError(f"d_model must be a multiple of 4 for the 2-D position encoding, got {d_model}")
        self.d_model = d_model
        self.model = DenseNet(growth_rate=growth_rate, num_layers=num_layers)
        self.feature_proj = nn.Conv2d(self.model.out_channels, d_model, kernel_size=1)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, img: Tensor, img_mask: Tensor) -> Tuple[Tensor, Tensor]:
        """img [b, 1, H, W], img_mask [b, H, W] (True = padding) ->
        features [b, h, w, d_model] and mask [b, h, w], stride 16."""
        if img.dim() != 4 or img.shape[1] != 1:
            raise ValueError(f"img must be [b, 1, H, W], got {tuple(img.shape)}")
        if img_mask.shape != (img.shape[0], img.shape[2], img.shape[3]) or img_mask.dtype != torch.bool:
            raise ValueError(
                f"img_mask must be a bool tensor of shape {(img.shape[0], img.shape[2], img.shape[3])}, "
                f"got {img_mask.dtype} {tuple(img_mask.shape)}"
            )
        feature, mask = self.model(img, img_mask)
        feature = conv1x1(feature, self.feature_proj.weight, self.feature_proj.bias).permute(0, 2, 3, 1)
        # in the features' dtype: float16/bfloat16 models stay in their dtype (the LayerNorm needs it)
        feature = feature + image_position_encoding(mask, self.d_model).to(feature.dtype)
        return self.norm(feature), mask
