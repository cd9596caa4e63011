"""BatchNorm with running statistics as what it is, a per-channel affine map, so that the op
before it can absorb it (the ARM's projection, the encoder's convolutions)."""
from typing import Tuple

import torch
from torch import Tensor


def running_affine(bn) -> Tuple[Tensor, Tensor]:
    """(scale, shift) [channels] with bn(x) = x * scale + shift per channel when bn normalises
    with its running statistics (eval mode); bn an nn.BatchNorm1d/2d, affine or not."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    return scale, (0.0 if bn.bias is None else bn.bias) - bn.running_mean * scale
