"""CoMER's bidirectional beam search, step for step: the oracle of every faster path.

It is slow on purpose, as CoMER's is: each step re-runs the decoder over the whole
prefix of every beam, and candidates are walked one by one in Python.
"""
from typing import List, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.beam_scorer_step.finished_lists import length_penalty
from ..vocab import EOS_IDX, PAD_IDX, SOS_IDX
from .hypotheses import BeamSearchOutput, Hypothesis, no_images_output
from .options import check_search_args
from .rescoring import rescore, select_best


class FinishedHypotheses:
    """The n-best list of one item's ended hypotheses (HuggingFace's BeamHypotheses of
    2021, as CoMER uses it): scores are sum_logprob / len**alpha with len counting the
    start token; beyond `beam_size` entries the worst is evicted, ties by insertion order."""

    def __init__(self, beam_size: int, alpha: float, early_stopping: bool):
        self.beam_size = beam_size
        self.alpha = alpha
        self.early_stopping = early_stopping
        self.beams: List[Tuple[float, List[int]]] = []
        self.worst_score = 1e9

    def add(self, tokens: List[int], sum_logprobs: float) -> None:
        score = sum_logprobs / length_penalty(len(tokens), self.alpha)
        if len(self.beams) < self.beam_size or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self.beams) > self.beam_size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_running_sum: float, cur_len: int) -> bool:
        if len(self.beams) < self.beam_size:
            return False
        if self.early_stopping:
            return True
        return self.worst_score >= best_running_sum / length_penalty(cur_len, self.alpha)


def _first_pass(decoder, feature, mask, beam_size, max_len, alpha, early_stopping, temperature):
    batch = feature.shape[0]
    items = 2 * batch
    vocab_size = decoder.proj.out_features
    src, src_mask = torch.cat((feature, feature)), torch.cat((mask, mask))
    ids = torch.tensor([[SOS_IDX]] * batch + [[EOS_IDX]] * batch, device=feature.device)
    beam_scores = torch.zeros(items, dtype=torch.float32, device=feature.device)
    finished = [FinishedHypotheses(beam_size, alpha, early_stopping) for _ in range(items)]
    done = [False] * items

    cur_len = 1
    while cur_len < max_len and not all(done):
        logits = decoder(src, src_mask, ids)[:, -1] / temperature
        scores = F.log_softmax(logits, dim=-1) + beam_scores[:, None]
        scores = scores.view(items, -1)  # one row per item: its beams' candidates side by side
        top_scores, top_ids = scores.topk(2 * beam_size, dim=1)
        parents, tokens = top_ids // vocab_size, top_ids % vocab_size
        if cur_len == 1:
            ids = ids.repeat_interleave(beam_size, dim=0)
            src, src_mask = src.repeat_interleave(beam_size, dim=0), src_mask.repeat_interleave(beam_size, dim=0)

        next_scores = torch.zeros(items, beam_size, dtype=top_scores.dtype, device=ids.device)
        next_tokens = torch.full((items, beam_size), PAD_IDX, dtype=torch.long, device=ids.device)
        next_rows = torch.zeros(items, beam_size, dtype=torch.long, device=ids.device)
        for item in range(items):
            if done[item]:
                next_rows[item] = item * beam_size  # keeps decoding PAD without effect
                continue
            filled = 0
            for rank in range(2 * beam_size):
                row = item * beam_size + parents[item, rank].item()
                start, token = ids[row, 0].item(), tokens[item, rank].item()
                if (start, token) in ((SOS_IDX, EOS_IDX), (EOS_IDX, SOS_IDX)):
                    if rank < beam_size:
                        finished[item].add(ids[row].tolist(), top_scores[item, rank].item())
                else:
                    next_scores[item, filled] = top_scores[item, rank]
                    next_tokens[item, filled] = token
                    next_rows[item, filled] = row
                    filled += 1
                if filled == beam_size:
                    break
            done[item] = finished[item].is_done(next_scores[item].max().item(), cur_len)

        beam_scores = next_scores.view(-1)
        ids = torch.cat((ids[next_rows.view(-1)], next_tokens.view(-1, 1)), dim=1)
        cur_len += 1

    for item in range(items):
        if not done[item]:
            for row in range(item * beam_size, (item + 1) * beam_size):
                finished[item].add(ids[row].tolist(), beam_scores[row].item())
    hyps = [tokens[1:] for fh in finished for _, tokens in fh.beams]
    # CoMER stores the first-pass scores in a float32 tensor; the rounding is part of its answers.
    scores = torch.tensor([score for fh in finished for score, _ in fh.beams], dtype=torch.float32, device=feature.device)
    return hyps, scores


@torch.no_grad()
def reference_beam_search(
    model: torch.nn.Module,
    img: Tensor,
    img_mask: Tensor,
    beam_size: int = 10,
    max_len: int = 200,
    alpha: float = 1.0,
    early_stopping: bool = False,
    temperature: float = 1.0,
    return_details: bool = False,
) -> Union[List[Hypothesis], BeamSearchOutput]:
    """CoMER's bidirectional beam search with rescoring (docs/function.md, 'Beam search', 'Rescoring').

    img [b, 1, H, W], img_mask [b, H, W] (True = padding); the model must be in eval mode.
    Returns per image a Hypothesis (.seq left to right without SOS/EOS, .score), or with
    return_details a BeamSearchOutput that also holds the first pass and its rescoring.
    Arguments are checked as the engine's (a batch of 0 images returns []).
    """
    alpha = check_search_args(model, img, img_mask, beam_size, max_len, temperature, alpha, early_stopping).alpha
    if img.shape[0] == 0:
        return no_images_output(img, return_details)
    feature, mask = model.encoder(img, img_mask)
    hyps, scores = _first_pass(model.decoder, feature, mask, beam_size, max_len, alpha, early_stopping, temperature)
    reverse = rescore(model.decoder, feature, mask, hyps, beam_size, alpha, temperature)
    best = select_best(hyps, scores + reverse, feature.shape[0], beam_size)
    return BeamSearchOutput(best, hyps, scores, reverse) if return_details else best
