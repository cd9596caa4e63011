"""The beam scorer's step as a torch.library custom op (`torch.ops.fastcomer.beam_scorer_step`),
so that torch.compile and torch.export trace a kernel call as one node with a fake
implementation. The op takes the finished lists' tensors (`FinishedLists.state`), which it
updates in place as the entry does, and rebuilds the lists over them (`FinishedLists.over`).

`beam_scorer_step_op` is what the searches call: the plain-PyTorch backend runs the entry
directly, so that compilers and exporters see its operations; traced, the kernel backend goes
through the op; eager calls skip it.
"""
from typing import Tuple

import torch
from torch import Tensor

from ..registry import OPS
from ..tracing import is_tracing
from . import beam_scorer_step
from .finished_lists import FinishedLists


@torch.library.custom_op(OPS["beam_scorer_step"].custom_op,
                         mutates_args=("beam_scores", "done", "score", "stamp", "length", "finished_tokens", "count",
                                       "clock"))
def _beam_scorer_step_op(
    logits: Tensor, temperature: float, beam_scores: Tensor, done: Tensor, end_token: Tensor,
    score: Tensor, stamp: Tensor, length: Tensor, finished_tokens: Tensor, count: Tensor, clock: Tensor,
    penalty: Tensor, early_stopping: bool, tokens: Tensor, position: Tensor, backend: str,
) -> Tuple[Tensor, Tensor]:
    finished = FinishedLists.over((score, stamp, length, finished_tokens, count, clock, penalty), early_stopping)
    return beam_scorer_step(logits, temperature, beam_scores, done, end_token, finished, tokens, position,
                            backend=backend)


@_beam_scorer_step_op.register_fake
def _(logits, *rest):
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.long), logits.new_empty(rows, dtype=torch.long)


def beam_scorer_step_op(logits: Tensor, temperature: float, beam_scores: Tensor, done: Tensor, end_token: Tensor,
                        finished: FinishedLists, tokens: Tensor, position: Tensor,
                        backend: str) -> Tuple[Tensor, Tensor]:
    """`beam_scorer_step` (same arguments and results) for a resolved backend ('torch' or
    'triton'): traced, the kernel as the custom op and 'torch' inline; eager, the entry itself."""
    if backend == "torch" or not is_tracing(logits):
        return beam_scorer_step(logits, temperature, beam_scores, done, end_token, finished, tokens, position,
                                backend=backend)
    return torch.ops.fastcomer.beam_scorer_step(logits, float(temperature), beam_scores, done, end_token,
                                                *finished.state(), finished.early_stopping, tokens, position, backend)
