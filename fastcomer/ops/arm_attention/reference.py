"""CoMER's cross-attention with the ARM in plain PyTorch, over the op's tensors: the torch
backend of `arm_attention` and the function its Triton kernels compute. It is the function
of fastcomer.model's `MultiheadAttention` with the `AttentionRefinementModule` (the same
pieces: `masked_softmax`, `arm_refinement`, `masked_batch_norm`), on q, k, v already projected
and split into heads."""
from functools import partial
from typing import Optional, Tuple

import torch
from torch import Tensor

from ...model.arm import arm_refinement, masked_batch_norm
from ...model.attention import masked_softmax
from .inputs import ARMWeights


def _dropout(attn: Tensor, p: float, generator: Optional[torch.Generator]) -> Tensor:
    if p == 0.0:
        return attn
    keep = torch.rand(attn.shape, generator=generator, device=attn.device) >= p
    return attn * keep / (1.0 - p)


def arm_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, height: int,
                  prev_attn: Optional[Tensor], arm: Optional[ARMWeights], bn_training: bool, dropout_p: float,
                  seed: int) -> Tuple[Tensor, Tensor]:
    """The entry's function on checked inputs (L = height x width, row-major). Dropout masks
    come from a torch.Generator seeded with `seed` on q's device: another random stream than
    the Triton kernels', so the two backends agree in distribution only when dropout_p > 0."""
    nhead = q.shape[0] // key_padding_mask.shape[0]
    generator = None
    if dropout_p > 0:
        generator = torch.Generator(device=q.device).manual_seed(seed)
    scores = torch.bmm(q, k.transpose(1, 2))
    attn = _dropout(masked_softmax(scores, key_padding_mask, None, nhead), dropout_p, generator)
    if arm is not None:
        normalize = partial(masked_batch_norm, weight=arm.bn_weight, bias=arm.bn_bias, running_mean=arm.running_mean,
                            running_var=arm.running_var, num_batches_tracked=arm.num_batches_tracked,
                            momentum=arm.momentum, eps=arm.eps, training=bn_training)
        r = arm_refinement(prev_attn, attn, key_padding_mask, height, nhead, arm.coverage, arm.conv_weight,
                           arm.conv_bias, arm.proj_weight, normalize)
        attn = _dropout(masked_softmax(scores - r, key_padding_mask, None, nhead), dropout_p, generator)
    return torch.bmm(attn, v), attn
