"""Seeded random CoMER models (small, weights scaled by fastcomer.benchmarking.scale_weights so
that beams end at various lengths) and padded batches of random images."""
import random

import torch

from fastcomer import CoMER
from fastcomer.benchmarking import scale_weights


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
