"""The beam scorer of one beam step: log-softmax of the logits, top 2 x beam_size candidates
per item over beams x vocabulary, end tokens, insertion into the finished lists (with
eviction), done flags and the next beams.

`beam_scorer_step` is what `SearchSlots.step` calls and the one place that branches on the
backend: the fused Triton kernel (`triton_kernel`, one launch) for the kernel backends, the
plain PyTorch code (`reference`) for the torch backend.
"""
from typing import Tuple

from torch import Tensor

from ... import backends
from ...search.finished_lists import FinishedLists
from .reference import score_step

__all__ = ["beam_scorer_step"]


def beam_scorer_step(logits: Tensor, temperature: float, beam_scores: Tensor, done: Tensor, end_token: Tensor,
                     finished: FinishedLists, tokens: Tensor, position: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """CoMER's scoring of one beam step for `items` searches of beam_size rows each.

    logits [items * beam_size, vocab]: the decoder's output for every row; temperature > 0;
    beam_scores [items, beam_size] float32 (float64 for float64 models): each beam's sum of
    log-probabilities; done [items] bool: searches that add nothing more to their list;
    end_token [items]: the token that ends each search's hypotheses; finished: the searches'
    finished lists; tokens [rows, max_len]: the rows' tokens; position: 0-dim long tensor,
    the index of the rows' newest token.
    Updates beam_scores, done and finished in place, and returns (parents, next_tokens),
    both [rows] long: new row r continues row parents[r] with token next_tokens[r].
    backend: the resolved backend of the step ('torch', 'triton' or 'cuda'); the kernel
    backends run the Triton kernel (also for 'cuda': there is no CUDA C scorer), unless Triton
    cannot run, where 'cuda' takes the torch code.
    """
    args = (logits, temperature, beam_scores, done, end_token, finished, tokens, position)
    if backend not in ("torch", "triton", "cuda"):
        raise ValueError(f"backend must be a resolved backend ('torch', 'triton' or 'cuda'), got {backend!r}")
    if backend == "triton" or (backend == "cuda" and backends.triton_status()[0]):
        from .triton_kernel import triton_score_step

        return triton_score_step(*args)
    return score_step(*args)
