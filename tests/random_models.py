"""Seeded random CoMER models and image batches whose beam searches end at various
lengths: random BatchNorm statistics, a strong ARM, a peaked output projection and
biased end tokens (as the golden file's weights are scaled)."""
import random

import torch

from fastcomer import CoMER
from fastcomer.vocab import EOS_IDX, SOS_IDX


@torch.no_grad()
def scale_weights(
    model: CoMER, seed: int, end_bias: float, end_scale: float, arm_scale: float = 4.0, proj_scale: float = 2.0
) -> CoMER:
    """Make every part of a freshly initialised CoMER matter, in place; returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    arm = model.decoder.model.arm
    if arm is not None:
        arm.conv.weight.mul_(arm_scale)
        arm.proj.weight.mul_(arm_scale)
        bn = arm.post_norm.bn
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
    proj = model.decoder.proj
    proj.weight.mul_(proj_scale)
    proj.bias.copy_(torch.randn(proj.out_features, generator=gen))
    for end in (EOS_IDX, SOS_IDX):  # end tokens whose odds swing from step to step
        proj.weight[end] *= end_scale
        proj.bias[end] += end_bias
    return model.eval()


def random_model(seed: int, dtype=torch.float64) -> CoMER:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    nhead = rng.choice([2, 4, 8])
    d_model = nhead * rng.choice([4, 8]) if nhead == 8 else rng.choice([32, 48, 64])
    cross, self_ = rng.choice([(True, True), (True, False), (False, True)])
    model = CoMER(
        d_model=d_model, growth_rate=rng.randint(4, 8), num_layers=rng.randint(1, 2), nhead=nhead,
        num_decoder_layers=rng.randint(2, 4), dim_feedforward=2 * d_model, dropout=0.0, dc=rng.randint(4, 16),
        cross_coverage=cross, self_coverage=self_,
    )
    return scale_weights(model.to(dtype), seed, end_bias=rng.uniform(-1.0, 3.0), end_scale=rng.uniform(3.0, 6.0))


def random_images(seed: int, sizes, dtype=torch.float64):
    """A padded batch of random images of the given (H, W) sizes: img [b, 1, H, W], img_mask [b, H, W]."""
    gen = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    img = torch.zeros(len(sizes), 1, height, width, dtype=dtype)
    mask = torch.ones(len(sizes), height, width, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        img[i, :, :h, :w] = torch.rand(1, h, w, generator=gen, dtype=dtype)
        mask[i, :h, :w] = False
    return img, mask
