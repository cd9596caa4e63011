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
from .search.images import check_decode_args, decode_images, size_buckets
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


# Pixels of one image before scaling, at most (recognize's max_pixels; Pillow refuses more than
# 2 x PIL.Image.MAX_IMAGE_PIXELS on its own, whatever this says).
DEFAULT_MAX_PIXELS = 64 * 2**20


class ImageError(ValueError):
    """An image that cannot be read: not an image file, truncated or corrupt, too large, or of
    pixels whose range is unknown; the message says which."""


class ImageTooLarge(ImageError):
    """An image of more pixels than the limit (`max_pixels`)."""


def _pil():
    from .extras import require

    require("images", "PIL", purpose="reading image files")
    from PIL import Image

    return Image


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width} x {height} pixels, more than max_pixels={max_pixels}")


def read_image_file(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> "PIL.Image.Image":  # noqa: F821
    """An image file (a path or a binary file object) decoded by Pillow, its first frame (of an
    animated GIF, a multi-page TIFF). Every failure is an ImageError naming its reason: not an
    image file, truncated or corrupt (Pillow's plugins raise OSError, SyntaxError, zlib and
    struct errors...), more than max_pixels pixels (checked before the pixels are decoded)."""
    import warnings

    Image = _pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is max_pixels
            image = Image.open(source)
        _check_pixels(*image.size, max_pixels)
        image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(str(err)) from None
    except FileNotFoundError:
        raise ImageError("No such file") from None
    except IsADirectoryError:
        raise ImageError("Is a directory") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image file Pillow can read") from None
    except Exception as err:  # noqa: BLE001 - Pillow's decoders raise many types for a damaged file
        raise ImageError(f"cannot be decoded: {type(err).__name__}: {err}") from None
    return image


def _flatten_alpha(gray: np.ndarray, alpha: np.ndarray, full: float) -> Tuple[np.ndarray, bool]:
    """(pixels, 8-bit) of gray composited over the paper through alpha (both 0..full); an
    opaque image is returned as it is. Which pixels are the paper: when the opaque ones cover
    less than half the image they are the strokes, and the paper is the opposite of their mean
    brightness (dark strokes on transparency read as on white, light ones as on black); else
    they are a picture with its own paper, and the transparency is more of that paper (the
    side their mean brightness is on)."""
    if alpha.min() >= full:
        return gray, full == 255
    gray, alpha = gray.astype(np.float64) / full, alpha.astype(np.float64) / full
    opaque_mean = float((gray * alpha).sum() / max(float(alpha.sum()), 1e-12))
    light = opaque_mean >= 0.5
    paper = (0.0 if light else 1.0) if alpha.mean() < 0.5 else (1.0 if light else 0.0)
    return gray * alpha + paper * (1.0 - alpha), False


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _pil_pixels(image) -> Tuple[np.ndarray, bool]:
    """A PIL image's pixels as `_grayscale` gives them, EXIF orientation applied; 16-bit (and
    'I' images of 0..65535, as Pillow reads 16-bit PGM) scaled by 65535, float ('F') ones
    taken as 0..1; transparency flattened (`_flatten_alpha`)."""
    from PIL import ImageOps

    try:
        image = ImageOps.exif_transpose(image)
    except Exception as err:  # noqa: BLE001 - a damaged EXIF block
        raise ImageError(f"cannot apply its EXIF orientation: {type(err).__name__}: {err}") from None
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(f"32-bit integer pixels outside 0..65535 (range {values.min():g}..{values.max():g}): "
                             "their scale is unknown; convert the image to 8 or 16 bits")
        return values / 65535, False
    if image.mode == "F":
        return _unit_floats(np.asarray(image)), False
    try:
        if image.mode in _ALPHA_MODES or "transparency" in image.info:  # palette and colour-key transparency too
            rgba = image.convert("RGBA")
            return _flatten_alpha(np.asarray(rgba.convert("L")), np.asarray(rgba.getchannel("A")), 255)
        return np.asarray(image.convert("L")), True  # 1-bit, palette, RGB, CMYK, YCbCr...
    except ValueError as err:  # a mode Pillow cannot convert
        raise ImageError(f"{image.mode} pixels: {err}") from None


def _unit_floats(image: np.ndarray) -> np.ndarray:
    values = image.astype(np.float32)
    if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > 1:
        raise ValueError("float pixels must be finite and in [0, 1] (as ToTensor gives)")
    return values


def _grayscale(image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[np.ndarray, bool]:
    """(H x W array: 0..255 for 8-bit images, 0..1 for others; whether it is 8-bit)."""
    if isinstance(image, (str, os.PathLike)):
        with read_image_file(image, max_pixels) as opened:
            return _pil_pixels(opened)
    if type(image).__module__.startswith("PIL.") and hasattr(image, "convert"):
        _check_pixels(*image.size, max_pixels)
        return _pil_pixels(image)
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.dim() == 3:  # [C, H, W], as ToTensor gives
            image = image.permute(1, 2, 0)
        image = image.numpy() if image.dtype != torch.bfloat16 else image.float().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a path, a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    if image.ndim in (2, 3):
        _check_pixels(image.shape[1], image.shape[0], max_pixels)
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        if image.shape[2] == 1:
            image = image[:, :, 0]
        elif image.dtype == np.uint8:
            gray = np.asarray(_pil().fromarray(np.ascontiguousarray(image[:, :, :3])).convert("L"))
            return (gray, True) if image.shape[2] == 3 else _flatten_alpha(gray, image[:, :, 3], 255)
        else:
            colour = _unit_floats(image)
            gray = colour[:, :, :3].astype(np.float64) @ np.array(LUMA)
            return (gray, False) if image.shape[2] == 3 else _flatten_alpha(gray, colour[:, :, 3].astype(np.float64), 1.0)
    if image.ndim != 2:
        raise ValueError(f"expected H x W, H x W x C or C x H x W (C in 1, 3, 4) pixels, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image, True
    if image.dtype == np.uint16:
        return image / 65535, False
    if image.dtype == np.bool_ or np.issubdtype(image.dtype, np.floating):
        return _unit_floats(image), False
    raise ValueError(f"expected uint8, uint16, bool or float pixels, got {image.dtype}")


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


def _check_max_pixels(max_pixels) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


def _check_invert(invert) -> None:
    if invert not in (True, False, "auto") or isinstance(invert, int) and not isinstance(invert, bool):
        raise ValueError(f"invert must be True, False or 'auto', got {invert!r}")


def prepare_image(image: ImageSource, invert: Union[bool, str] = "auto", max_pixels: int = DEFAULT_MAX_PIXELS) -> Tensor:
    """One image as CoMER evaluates it: [1, H, W] float32 in [0, 1], light strokes on dark.

    invert: True or False, or "auto" (default): invert when the mean brightness is above one
    half, i.e. the image is mostly light (a scan or photo of paper; CoMER's own images are
    mostly dark). Raises ValueError/TypeError for an unreadable or invalid image."""
    _check_invert(invert)
    _check_max_pixels(max_pixels)
    pixels, eight_bit = _grayscale(image, max_pixels)
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
    max_pixels: int = DEFAULT_MAX_PIXELS,
    **search_kwargs,
) -> Union[List[str], List[Recognition]]:
    """LaTeX for each image, in input order.

    model: fastcomer's CoMER, the public code's CoMER or LitCoMER, in eval mode, any dtype and
    device. images: paths, PIL images, numpy arrays (H x W or H x W x C) or tensors ([H, W] or
    [C, H, W]) of any sizes; uint8 pixels are 0..255, float ones 0..1. Each is prepared as
    `prepare_image(image, invert, max_pixels)` and decoded by `decode_images` (batches of up to
    batch_size images of similar sizes; beam_size, max_len and search_kwargs go to
    `beam_search`). progress(done, total) is called after each batch. Every argument is checked
    before any image is read.

    Returns the LaTeX strings; with details=True, a `Recognition` per image (LaTeX, tokens,
    score, or the error of an image that could not be read). Without details, a failed image
    raises `RecognitionError` after the others were decoded (their answers in its `results`).
    """
    model = as_comer(model)  # fastcomer's CoMER, the public code's CoMER or LitCoMER
    _check_invert(invert)
    _check_max_pixels(max_pixels)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(images, (str, os.PathLike, np.ndarray, Tensor)):
        raise TypeError("images must be a sequence of images; for one image pass [image]")
    check_decode_args(model, dict(search_kwargs, beam_size=beam_size, max_len=max_len))
    results, prepared = [], {}
    for i, image in enumerate(images):
        name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else getattr(image, "filename", "") or f"image {i}"
        results.append(Recognition(name=name))
        try:
            prepared[i] = prepare_image(image, invert, max_pixels)
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
