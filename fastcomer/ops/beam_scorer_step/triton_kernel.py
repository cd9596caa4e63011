"""The beam scorer as one Triton kernel: one program per item (search).

A program holds its item's beam_size x vocab candidate scores in registers (log-softmax of
each row plus the beam's score), picks the top 2 x beam_size of them one at a time (ties:
lower flat index first), then offers the ended ones among the first beam_size to the
item's finished list in rank order, as CoMER adds them one by one (eviction of the worst
entry, ties: oldest first), and writes the next beams, the done flag and the list. On a GPU the
log-softmax is Triton's float32 arithmetic (approximate division and exp), not bitwise
torch's: a candidate tied with another to float32 rounding may rank differently.

The insertion clock of the lists (one per FinishedLists, shared by its items) is read by every
program and advanced after the launch by a device op on the same stream, as the torch path
does: no state outlives a launch, so launches on other lists (concurrent searches, a graph's
warm-up on its side stream) can overlap this one freely.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_launch import launch_kernel
from .finished_lists import FinishedLists

# Flat candidate index of padding lanes: above every real one, so never picked first.
NO_CANDIDATE = tl.constexpr(2**31 - 1)


@triton.jit
def _beam_scorer_kernel(
    logits_ptr, beam_scores_ptr, done_ptr, end_token_ptr, tokens_ptr, position_ptr,
    list_score_ptr, list_stamp_ptr, list_length_ptr, list_tokens_ptr, list_count_ptr, clock_ptr,
    penalty_ptr, parents_ptr, next_tokens_ptr,
    temperature, beam, vocab, max_len, stride_logits,
    EARLY_STOPPING: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    item = tl.program_id(0).to(tl.int64)
    beams = tl.arange(0, BLOCK_B)
    words = tl.arange(0, BLOCK_V)
    ranks = tl.arange(0, BLOCK_K)
    beam_ok = beams < beam
    valid = beam_ok[:, None] & (words < vocab)[None, :]
    first_row = item * beam

    # Candidate scores: log_softmax(logits / temperature) + beam score, as the torch code.
    x = tl.load(logits_ptr + (first_row + beams)[:, None] * stride_logits + words[None, :], mask=valid,
                other=float("-inf"))
    # rounded to the logits' dtype after the division, as torch's logits / temperature is; the
    # division itself, exp and log are Triton's, which on a GPU may be approximate (div.full.f32,
    # ex2.approx): scores then agree with torch's to float32 rounding, bitwise only in the interpreter
    x = (x.to(tl.float32) / temperature).to(x.dtype).to(tl.float32)
    row_max = tl.max(x, axis=1)
    shifted = x - tl.where(beam_ok, row_max, 0.0)[:, None]
    log_sum = tl.log(tl.where(beam_ok, tl.sum(tl.where(valid, tl.exp(shifted), 0.0), axis=1), 1.0))
    log_probs = (shifted - log_sum[:, None]).to(logits_ptr.dtype.element_ty)
    beam_score = tl.load(beam_scores_ptr + first_row + beams, mask=beam_ok, other=0.0)
    scores = log_probs.to(beam_score.dtype) + beam_score[:, None]
    flat = tl.where(valid, beams[:, None] * vocab + words[None, :], NO_CANDIDATE)

    # Top 2 x beam_size, best first.
    top_scores = tl.full((BLOCK_K,), float("-inf"), beam_score.dtype)
    top_ids = tl.zeros((BLOCK_K,), tl.int32)
    for j in range(0, 2 * beam):
        best = tl.max(tl.where(flat != NO_CANDIDATE, scores, float("-inf")))
        pick = tl.min(tl.where(scores == best, flat, NO_CANDIDATE))
        flat = tl.where(flat == pick, NO_CANDIDATE, flat)
        top_scores = tl.where(ranks == j, best, top_scores)
        top_ids = tl.where(ranks == j, pick, top_ids)
    parent = first_row + (top_ids // vocab).to(tl.int64)
    token = (top_ids % vocab).to(tl.int64)
    ends = token == tl.load(end_token_ptr + item)
    was_done = tl.load(done_ptr + item) != 0
    adds = tl.load(done_ptr + item) == 0

    # The finished list: the ended candidates among the first beam_size, offered in rank order.
    length = tl.load(position_ptr) + 1
    penalty = tl.load(penalty_ptr + length)
    clock = tl.load(clock_ptr)
    count = tl.load(list_count_ptr + item)
    list_score = tl.load(list_score_ptr + item * (beam + 1) + beams, mask=beam_ok, other=float("inf"))
    list_stamp = tl.load(list_stamp_ptr + item * (beam + 1) + beams, mask=beam_ok, other=0)
    offered_so_far = tl.full((), 0, tl.int64)
    times = tl.arange(0, BLOCK_T)
    for j in range(0, beam):
        at_j = ranks == j
        offered = (tl.sum(tl.where(at_j & ends, 1, 0)) > 0) & adds
        score = tl.sum(tl.where(at_j, top_scores, 0.0)).to(tl.float64) / penalty
        worst = tl.min(list_score)
        oldest_worst = tl.min(tl.where(list_score == worst, list_stamp, 2**62))
        victim = tl.min(tl.where((list_score == worst) & (list_stamp == oldest_worst), beams, BLOCK_B))
        has_room = count < beam
        slot = tl.where(has_room, count, victim)
        accepted = offered & (has_room | (score > worst))
        stamp = clock + offered_so_far
        list_score = tl.where(accepted & (beams == slot), score, list_score)
        list_stamp = tl.where(accepted & (beams == slot), stamp, list_stamp)
        entry = item * (beam + 1) + slot
        tl.store(list_score_ptr + entry, score, mask=accepted)
        tl.store(list_stamp_ptr + entry, stamp, mask=accepted)
        tl.store(list_length_ptr + entry, length, mask=accepted)
        source = tokens_ptr + tl.sum(tl.where(at_j, parent, 0)) * max_len
        copied = tl.where(accepted, max_len, 0)  # one comparison as the mask: the interpreter mistypes bool & scalar
        for start in range(0, max_len, BLOCK_T):
            t = start + times
            tl.store(list_tokens_ptr + entry * max_len + t, tl.load(source + t, mask=t < copied), mask=t < copied)
        count += tl.where(accepted & has_room, 1, 0)
        offered_so_far += tl.where(offered, 1, 0)
    tl.store(list_count_ptr + item, count)

    # The next beams: the first beam_size candidates that do not end, in rank order.
    goes_on = (~ends) & (ranks < 2 * beam)
    place = tl.cumsum(goes_on.to(tl.int32), axis=0) - 1
    kept = goes_on & (place < beam)
    tl.store(beam_scores_ptr + first_row + place, top_scores, mask=kept)
    tl.store(parents_ptr + first_row + place, parent, mask=kept)
    tl.store(next_tokens_ptr + first_row + place, token, mask=kept)
    best_running = tl.max(tl.where(kept, top_scores, float("-inf")))
    full = count == beam
    if EARLY_STOPPING:
        now_done = full
    else:
        now_done = full & (tl.min(list_score) >= best_running.to(tl.float64) / penalty)
    tl.store(done_ptr + item, (was_done | now_done).to(tl.int8))


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def beam_scorer_step(logits: Tensor, temperature: float, beam_scores: Tensor, done: Tensor, end_token: Tensor,
                     finished: FinishedLists, tokens: Tensor, position: Tensor,
                     num_warps: int = 8) -> Tuple[Tensor, Tensor]:
    """Launches the kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); see
    `fastcomer.ops.beam_scorer_step.beam_scorer_step`."""
    items, beam = beam_scores.shape
    rows, vocab = logits.shape
    if rows != items * beam or vocab < 2 * beam:
        raise ValueError(f"beam scorer: logits must be [{items * beam}, >= {2 * beam}], got {tuple(logits.shape)}")
    if logits.stride(1) != 1 or not beam_scores.is_contiguous() or not tokens.is_contiguous():
        raise ValueError("beam scorer: logits need a unit last stride, beam_scores and tokens must be contiguous")
    if beam_scores.dtype != torch.float32 or logits.dtype == torch.float64:
        raise ValueError(f"beam scorer kernel: float32 beam scores and float32/16/bf16 logits expected, "
                         f"got {beam_scores.dtype} and {logits.dtype}")
    parents = torch.empty(rows, dtype=torch.long, device=logits.device)
    next_tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    max_len = tokens.shape[1]
    launch_kernel(_beam_scorer_kernel, (items,),
        logits, beam_scores, done.view(torch.int8), end_token, tokens, position,
        finished.score, finished.stamp, finished.length, finished.tokens, finished.count, finished.clock,
        finished.penalty, parents, next_tokens,
        float(temperature), beam, vocab, max_len, logits.stride(0),
        EARLY_STOPPING=finished.early_stopping, BLOCK_B=_pow2(beam), BLOCK_V=_pow2(vocab),
        BLOCK_K=_pow2(2 * beam), BLOCK_T=min(_pow2(max_len), 256), num_warps=num_warps,
    )
    finished.clock += beam  # after every program read it (stream order)
    return parents, next_tokens
