"""Decoding many images of different sizes: batches of similar sizes, to cut padding."""
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .engine import beam_search
from .hypotheses import Hypothesis


def pad_images(images: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """[1, H, W] images -> img [b, 1, Hmax, Wmax] (zeros outside each image), img_mask [b, Hmax, Wmax] (True = padding)."""
    height, width = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    img = images[0].new_zeros(len(images), 1, height, width)
    mask = torch.ones(len(images), height, width, dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        img[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return img, mask


def size_buckets(sizes: Sequence[Tuple[int, int]], batch_size: int) -> List[List[int]]:
    """Indices of images grouped in batches of up to batch_size, images of one size together
    and neighbouring sizes next to each other (sorted by height, then width)."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def decode_images(model, images: Sequence[Tensor], batch_size: int = 16, **search_kwargs) -> List[Hypothesis]:
    """Beam search (`fastcomer.beam_search`, with search_kwargs) over images [1, H, W] or
    [H, W] of any sizes, on the model's device; answers in input order.

    Each answer is CoMER's for the padded batch its image lands in; images of one size are
    batched together, so when every batch holds a single size (or batch_size is 1) the
    answers equal those of decoding each image alone.

    Floating-point images are converted to the model's dtype; other types raise TypeError
    (integer pixels are not rescaled for you). Every image is checked before any search.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__} {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if search_kwargs.get("return_details"):
        raise ValueError("decode_images returns answers only; call beam_search for return_details")
    param = next(model.parameters())
    prepared = []
    for i, im in enumerate(images):
        if not isinstance(im, Tensor) or not im.dtype.is_floating_point:
            kind = f"a {im.dtype} tensor" if isinstance(im, Tensor) else type(im).__name__
            raise TypeError(f"image {i}: expected a floating-point torch.Tensor, got {kind}")
        if im.dim() not in (2, 3) or (im.dim() == 3 and im.shape[0] != 1) or im.numel() == 0:
            raise ValueError(f"image {i}: expected a non-empty [1, H, W] or [H, W] tensor, got {tuple(im.shape)}")
        if not bool(torch.isfinite(im).all()):
            raise ValueError(f"image {i} holds NaN or infinite pixels")
        prepared.append((im if im.dim() == 3 else im[None]).to(device=param.device, dtype=param.dtype))
    answers: List[Hypothesis] = [None] * len(prepared)  # type: ignore[list-item]
    for bucket in size_buckets([tuple(im.shape[1:]) for im in prepared], batch_size):
        img, mask = pad_images([prepared[i] for i in bucket])
        for i, hyp in zip(bucket, beam_search(model, img, mask, **search_kwargs)):
            answers[i] = hyp
    return answers
