"""The beam scorer of one beam step: log-softmax of the logits, top 2 x beam_size candidates
per item over beams x vocabulary, end tokens, insertion into the finished lists (with
eviction), done flags and the next beams.

`beam_scorer_step` is the entry and the one place that branches on the backend: the fused
Triton kernel (`triton_kernel`, one launch) or plain PyTorch (`reference`); see
`fastcomer.ops.dispatch` for how the backend is chosen. The finished lists it updates are
`finished_lists.FinishedLists`.
"""
from typing import Tuple

from torch import Tensor

from ..dispatch import BackendRequest, resolve
from .finished_lists import FinishedLists

__all__ = ["FinishedLists", "beam_scorer_step"]


def beam_scorer_step(logits: Tensor, temperature: float, beam_scores: Tensor, done: Tensor, end_token: Tensor,
                     finished: FinishedLists, tokens: Tensor, position: Tensor,
                     backend: BackendRequest = None) -> Tuple[Tensor, Tensor]:
    """CoMER's scoring of one beam step for `items` searches of beam_size rows each.

    logits [items * beam_size, vocab]: the decoder's output for every row; temperature > 0;
    beam_scores [items, beam_size] float32 (float64 for float64 models): each beam's sum of
    log-probabilities; done [items] bool: searches that add nothing more to their list;
    end_token [items]: the token that ends each search's hypotheses; finished: the searches'
    finished lists; tokens [rows, max_len]: the rows' tokens; position: 0-dim long tensor,
    the index of the rows' newest token, or [items] long, each search's own (searches that
    started at different steps; the torch backend only).
    Updates beam_scores, done and finished in place, and returns (parents, next_tokens),
    both [rows] long: new row r continues row parents[r] with token next_tokens[r].
    backend: as `fastcomer.ops.dispatch.resolve` takes it (the engine passes its plan's).
    """
    args = (logits, temperature, beam_scores, done, end_token, finished, tokens, position)
    if resolve("beam_scorer_step", logits, backend) == "triton":
        if position.dim() != 0:
            raise ValueError("beam_scorer_step: the Triton scorer takes one position for every search (0-dim), "
                             f"got shape {tuple(position.shape)}")
        from .triton_kernel import beam_scorer_step as triton_step

        return triton_step(*args)
    from .reference import beam_scorer_step as torch_step

    return torch_step(*args)
