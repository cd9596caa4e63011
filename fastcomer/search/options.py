"""The settings of a beam search, and the checks every search makes before any work."""
import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence, Tuple

import torch
from torch import Tensor

from ..model.encoder import FEATURE_STRIDE

# Which searches run per image: True = left to right (SOS ... EOS), False = right to left.
DIRECTIONS = {"both": (True, False), "l2r": (True,), "r2l": (False,)}


def search_directions(direction: str, allowed: Sequence[str] = tuple(DIRECTIONS)) -> Tuple[bool, ...]:
    if direction not in allowed:
        raise ValueError(f"direction must be one of {', '.join(map(repr, allowed))}, got {direction!r}")
    return DIRECTIONS[direction]


@dataclass(frozen=True)
class SearchOptions:
    """CoMER's beam-search settings (docs/function.md, 'Beam search'), every field checked on
    construction (TypeError for a wrong type, ValueError for a value out of range, each naming
    the field); `check_model` adds the limits set by a model. Frozen and hashable: the engine
    keys its kept static buffers (and CUDA graphs) on them."""

    beam_size: int = 10
    max_len: int = 200
    alpha: float = 1.0
    early_stopping: bool = False
    temperature: float = 1.0
    direction: str = "both"

    def __post_init__(self) -> None:
        _check_int("beam_size", self.beam_size)
        _check_int("max_len", self.max_len)
        _check_real("temperature", self.temperature)
        _check_real("alpha", self.alpha)
        if not isinstance(self.early_stopping, bool):
            raise TypeError(f"early_stopping must be a bool, got {type(self.early_stopping).__name__} {self.early_stopping!r}")
        search_directions(self.direction)
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be at least 2 (the start token and one more), got {self.max_len}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        # A float: an int alpha would make length**alpha exact integer powers (2**63 never ends).
        object.__setattr__(self, "alpha", float(self.alpha))

    def check_model(self, model) -> None:
        """The limits a model sets: eval mode, beam_size <= vocab/2 (a step keeps 2 x beam_size
        candidates), max_len <= its positions."""
        if model.training:
            raise ValueError("beam search needs the model in eval mode: call model.eval() first")
        vocab_size = model.config.vocab_size
        if 2 * self.beam_size > vocab_size:
            raise ValueError(f"beam_size must be in 1..{vocab_size // 2}, got {self.beam_size}")
        positions = model.decoder.pos_enc.pe.shape[0]
        if self.max_len > positions:
            raise ValueError(f"max_len must be in 2..{positions}, got {self.max_len}")

    @property
    def l2r(self) -> Tuple[bool, ...]:
        """The directions searched, in output order: True = left to right."""
        return DIRECTIONS[self.direction]


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


def _check_real(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_images(model, img: Any, img_mask: Any) -> None:
    """img: a floating-point tensor [b, 1, H, W] of the model's dtype and device, finite;
    img_mask: a bool tensor [b, H, W] that leaves some feature position of every image
    unpadded (the encoder keeps every FEATURE_STRIDE-th pixel's mask)."""
    for name, value in (("img", img), ("img_mask", img_mask)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}"
                            + (" (pass torch.zeros(b, H, W, dtype=torch.bool) for images without padding)"
                               if name == "img_mask" and value is None else ""))
    if img.dim() != 4 or img.shape[1] != 1 or img_mask.shape != (img.shape[0], img.shape[2], img.shape[3]):
        raise ValueError(f"expected img [b, 1, H, W] and img_mask [b, H, W], got {tuple(img.shape)} and {tuple(img_mask.shape)}")
    param = next(model.parameters())
    if img.dtype != param.dtype:
        raise TypeError(f"img must have the model's dtype {param.dtype}, got {img.dtype} "
                        f"(convert it with img.to({param.dtype}); integer images are not rescaled for you)")
    if img_mask.dtype != torch.bool:
        raise TypeError(f"img_mask must be a bool tensor (True = padding), got {img_mask.dtype}")
    if img.device != param.device or img_mask.device != param.device:
        raise ValueError(f"img and img_mask must be on the model's device {param.device}, got {img.device} and {img_mask.device}")
    if img.shape[2] == 0 or img.shape[3] == 0:
        raise ValueError(f"img must have a positive height and width, got {tuple(img.shape)}")
    if img.shape[0] == 0:
        return
    if not bool(torch.isfinite(img).all()):
        raise ValueError("img holds NaN or infinite pixels")
    padded = img_mask[:, ::FEATURE_STRIDE, ::FEATURE_STRIDE].flatten(1).all(dim=1)
    if bool(padded.any()):
        images = padded.nonzero().view(-1).tolist()
        raise ValueError(f"img_mask leaves nothing of image(s) {images} unpadded at the encoder's feature positions "
                         f"(every {FEATURE_STRIDE}th pixel from the top left): nothing to read")


def check_search_args(model, img: Tensor, img_mask: Tensor, beam_size: int, max_len: int, temperature: float,
                      alpha: float = 1.0, early_stopping: bool = False, direction: str = "both") -> SearchOptions:
    """The checks every search (the reference's too) makes before any work: the options
    (`SearchOptions`, with the model's limits) and the images; returns the options."""
    options = SearchOptions(beam_size, max_len, alpha, early_stopping, temperature, direction)
    options.check_model(model)
    _check_images(model, img, img_mask)
    return options
