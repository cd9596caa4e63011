"""What a search returns."""
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor


@dataclass
class Hypothesis:
    """One answer: token ids left to right without SOS/EOS, and its final score."""

    seq: List[int]
    score: float


@dataclass
class BeamSearchOutput:
    """A bidirectional beam search, inside and out, for b images.

    First-pass lists hold 2*b*beam_size entries: for each of the 2*b items (the b
    left-to-right searches, then the b right-to-left ones) its finished list in
    CoMER's order. Hypotheses are in decoding order, without the start token.
    """

    hyps: List[Hypothesis]
    first_pass_hyps: List[List[int]]
    first_pass_scores: Tensor  # float32, as CoMER's finalisation stores them
    rescore: Optional[Tensor]  # None for a single-direction search, which is not rescored


def no_images_output(img: Tensor, return_details: bool, rescored: bool = True):
    """What a beam search of a batch of 0 images returns: no answers (and empty details)."""
    if not return_details:
        return []
    scores = torch.zeros(0, dtype=torch.float32, device=img.device)
    return BeamSearchOutput([], [], scores, torch.zeros(0, dtype=img.dtype, device=img.device) if rescored else None)
