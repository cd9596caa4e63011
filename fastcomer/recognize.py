"""Images to LaTeX: CoMER's evaluation preprocessing, then `decode_images`.

CoMER evaluates a grayscale image (its CROHME images: light strokes on a dark background)
scaled into 16..256 x 16..1024 pixels (its data module's `ScaleToLimitRange`, bilinear),
`ToTensor` (uint8 / 255, float as it is), zero-padded in a batch with a mask.
`prepare_image` does exactly that (the bilinear resize is OpenCV's INTER_LINEAR mapping:
same sizes, values within one grey level of cv2's fixed-point arithmetic), and also turns
dark-on-light images (scans, photos of paper) into light-on-dark ones (`invert`).
"""
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .model.adapt import as_comer
from .search.images import decode_images, size_buckets
from .vocab import vocab

# CoMER's ScaleToLimitRange(w_lo=16, w_hi=1024, h_lo=16, h_hi=256)
HEIGHT_RANGE = (16, 256)
WIDTH_RANGE = (16, 1024)
# Luma weights of PIL's convert("L") (ITU-R 601-2), for float colour images
LUMA = (0.299, 0.587, 0.114)

ImageSource = Union[str, os.PathLike, np.ndarray, Tensor, "PIL.Image.Image"]  # noqa: F821


@dataclass
class Recognition:
    """One image's answer: LaTeX (CoMER's tokens joined by spaces), token ids and score; or its error."""

    name: str
    latex: Optional[str] = None
    tokens: Optional[List[int]] = None
    score: Optional[float] = None
    error: Optional[str] = None


class RecognitionError(ValueError):
    """Some images could not be read or were invalid; `results` holds every image's Recognition
    (the others decoded)."""

    def __init__(self, results: List[Recognition]):
        failed = [r for r in results if r.error is not None]
        listed = "; ".join(f"{r.name}: {r.error}" for r in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        super().__init__(f"{len(failed)} of {len(results)} images failed: {listed}{more}")
        self.results = results


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading image files needs Pillow: pip install 'fastcomer[images]'") from None
    return Image


def _grayscale(image) -> Tuple[np.ndarray, bool]:
    """(H x W array: 0..255 for 8-bit images, 0..1 for float ones; whether it is 8-bit)."""
    if isinstance(image, (str, os.PathLike)):
        with _pil().open(image) as opened:
            return np.asarray(opened.convert("L")), True
    if type(image).__module__.startswith("PIL.") and hasattr(image, "convert"):
        return np.asarray(image.convert("L")), True
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.dim() == 3:  # [C, H, W], as ToTensor gives
            image = image.permute(1, 2, 0)
        image = image.numpy() if image.dtype != torch.bfloat16 else image.float().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a path, a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        if image.shape[2] == 1:
            image = image[:, :, 0]
        elif image.dtype == np.uint8:
            return np.asarray(_pil().fromarray(image).convert("L")), True
        else:
            image = image[:, :, :3].astype(np.float64) @ np.array(LUMA)
    if image.ndim != 2:
        raise ValueError(f"expected H x W, H x W x C or C x H x W (C in 1, 3, 4) pixels, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image, True
    if image.dtype == np.bool_ or np.issubdtype(image.dtype, np.floating):
        values = image.astype(np.float32)
        if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > 1:
            raise ValueError("float pixels must be finite and in [0, 1] (as ToTensor gives)")
        return values, False
    raise ValueError(f"expected uint8, bool or float pixels, got {image.dtype}")


def limit_range_scale(height: int, width: int) -> float:
    """ScaleToLimitRange's factor for an image of height x width (1.0: kept as it is)."""
    (h_lo, h_hi), (w_lo, w_hi) = HEIGHT_RANGE, WIDTH_RANGE
    if not h_lo / w_hi <= height / width <= h_hi / w_lo:
        raise ValueError(f"aspect ratio {height}:{width} is outside CoMER's range "
                         f"[{h_lo}:{w_hi}, {h_hi}:{w_lo}] (height:width)")
    scale = min(h_hi / height, w_hi / width)
    if scale < 1.0:
        return scale
    return max(1.0, h_lo / height, w_lo / width)


def _axis(size: int, out: int, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """OpenCV INTER_LINEAR along one axis: source indices i0, i1 and weight of i1, per output pixel."""
    src = (torch.arange(out, dtype=torch.float64) + 0.5) / scale - 0.5
    i0 = src.floor()
    weight = src - i0
    weight[i0 < 0] = 0.0
    i0 = i0.clamp(0, size - 1).long()
    weight[i0 >= size - 1] = 0.0
    return i0, (i0 + 1).clamp(max=size - 1), weight


def resize_bilinear(pixels: Tensor, scale: float) -> Tensor:
    """cv2.resize(pixels, None, fx=scale, fy=scale, interpolation=INTER_LINEAR), in float64."""
    height, width = pixels.shape
    out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))  # cv2 rounds half to even too
    y0, y1, wy = _axis(height, out_h, scale)
    x0, x1, wx = _axis(width, out_w, scale)
    rows = pixels[y0] * (1 - wy)[:, None] + pixels[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx) + rows[:, x1] * wx


def _check_invert(invert) -> None:
    if invert not in (True, False, "auto") or isinstance(invert, int) and not isinstance(invert, bool):
        raise ValueError(f"invert must be True, False or 'auto', got {invert!r}")


def prepare_image(image: ImageSource, invert: Union[bool, str] = "auto") -> Tensor:
    """One image as CoMER evaluates it: [1, H, W] float32 in [0, 1], light strokes on dark.

    invert: True or False, or "auto" (default): invert when the mean brightness is above one
    half, i.e. the image is mostly light (a scan or photo of paper; CoMER's own images are
    mostly dark). Raises ValueError/TypeError for an unreadable or invalid image."""
    _check_invert(invert)
    pixels, eight_bit = _grayscale(image)
    if pixels.size == 0:
        raise ValueError(f"empty image of shape {pixels.shape}")
    full = 255.0 if eight_bit else 1.0
    values = torch.tensor(pixels, dtype=torch.float64)
    if invert is True or (invert == "auto" and float(values.mean()) > full / 2):
        values = full - values
    scale = limit_range_scale(*values.shape)
    if scale != 1.0:
        values = resize_bilinear(values, scale)
        if eight_bit:
            values = values.round()  # cv2 resizes uint8 to uint8
    return (values / full).float()[None]


def recognize(
    model: nn.Module,
    images: Sequence[ImageSource],
    beam_size: int = 10,
    max_len: int = 200,
    batch_size: int = 16,
    invert: Union[bool, str] = "auto",
    details: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    **search_kwargs,
) -> Union[List[str], List[Recognition]]:
    """LaTeX for each image, in input order.

    model: fastcomer's CoMER, the public code's CoMER or LitCoMER, in eval mode, any dtype and
    device. images: paths, PIL images, numpy arrays (H x W or H x W x C) or tensors ([H, W] or
    [C, H, W]) of any sizes; uint8 pixels are 0..255, float ones 0..1. Each is prepared as
    `prepare_image(image, invert)` and decoded by `decode_images` (batches of up to batch_size
    images of similar sizes; beam_size, max_len and search_kwargs go to `beam_search`).
    progress(done, total) is called after each batch.

    Returns the LaTeX strings; with details=True, a `Recognition` per image (LaTeX, tokens,
    score, or the error of an image that could not be read). Without details, a failed image
    raises `RecognitionError` after the others were decoded (their answers in its `results`).
    """
    model = as_comer(model)  # fastcomer's CoMER, the public code's CoMER or LitCoMER
    _check_invert(invert)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(images, (str, os.PathLike, np.ndarray, Tensor)):
        raise TypeError("images must be a sequence of images; for one image pass [image]")
    results, prepared = [], {}
    for i, image in enumerate(images):
        name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else getattr(image, "filename", "") or f"image {i}"
        results.append(Recognition(name=name))
        try:
            prepared[i] = prepare_image(image, invert)
        except (OSError, ValueError, TypeError) as err:  # unreadable or invalid: reported, the others go on
            results[i].error = str(err) or type(err).__name__
    indices = list(prepared)
    done = 0
    for bucket in size_buckets([tuple(prepared[i].shape[1:]) for i in indices], batch_size):
        batch = [indices[j] for j in bucket]
        hyps = decode_images(model, [prepared[i] for i in batch], batch_size=len(batch), beam_size=beam_size,
                             max_len=max_len, **search_kwargs)
        for i, hyp in zip(batch, hyps):
            results[i].latex, results[i].tokens, results[i].score = vocab.indices2label(hyp.seq), hyp.seq, hyp.score
        done += len(batch)
        if progress is not None:
            progress(done, len(indices))
    if details:
        return results
    if any(r.error is not None for r in results):
        raise RecognitionError(results)
    return [r.latex for r in results]
