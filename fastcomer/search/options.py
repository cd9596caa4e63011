"""The settings of a beam search, and the checks every search makes before any work."""
from dataclasses import dataclass
from typing import Sequence, Tuple

from torch import Tensor

# Which searches run per image: True = left to right (SOS ... EOS), False = right to left.
DIRECTIONS = {"both": (True, False), "l2r": (True,), "r2l": (False,)}


def search_directions(direction: str, allowed: Sequence[str] = tuple(DIRECTIONS)) -> Tuple[bool, ...]:
    if direction not in allowed:
        raise ValueError(f"direction must be one of {', '.join(map(repr, allowed))}, got {direction!r}")
    return DIRECTIONS[direction]


@dataclass(frozen=True)
class SearchOptions:
    """CoMER's beam-search settings (SPEC section 3). Frozen and hashable: the engine keys its
    kept static buffers (and CUDA graphs) on them."""

    beam_size: int = 10
    max_len: int = 200
    alpha: float = 1.0
    early_stopping: bool = False
    temperature: float = 1.0
    direction: str = "both"

    def __post_init__(self) -> None:
        search_directions(self.direction)

    @property
    def l2r(self) -> Tuple[bool, ...]:
        """The directions searched, in output order: True = left to right."""
        return DIRECTIONS[self.direction]


def check_search_args(model, img: Tensor, img_mask: Tensor, beam_size: int, max_len: int, temperature: float) -> None:
    """The checks every search (the reference's too) makes before any work."""
    if model.training:
        raise ValueError("beam search needs the model in eval mode: call model.eval() first")
    if img.dim() != 4 or img_mask.shape != (img.shape[0], img.shape[2], img.shape[3]):
        raise ValueError(f"expected img [b, 1, H, W] and img_mask [b, H, W], got {tuple(img.shape)} and {tuple(img_mask.shape)}")
    vocab_size = model.config.vocab_size
    if not 1 <= beam_size or 2 * beam_size > vocab_size:
        raise ValueError(f"beam_size must be in 1..{vocab_size // 2}, got {beam_size}")
    positions = model.decoder.pos_enc.pe.shape[0]
    if not 2 <= max_len <= positions:
        raise ValueError(f"max_len must be in 2..{positions}, got {max_len}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
