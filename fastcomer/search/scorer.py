"""CoMER's finished-hypothesis lists (SPEC section 3) as device tensors, vectorised over items.

`reference.FinishedHypotheses` is the per-item Python original; this computes the same
lists for all items at once, with no host sync, so that a beam step needs none.
"""
from typing import List, Tuple

import torch
from torch import Tensor

from ..vocab import PAD_IDX


class FinishedLists:
    """For each of `items` searches, its n-best list of ended hypotheses.

    Slot s < beam_size of item i holds one kept hypothesis: its score
    sum_logprob / len**alpha (float64, as CoMER's Python floats), an insertion stamp
    (the list's order and the eviction tie-break), its tokens and length. Filled slots
    are always 0..count-1: a new entry either fills the next slot or replaces the one it
    evicts. Slot beam_size is a write-off slot where rejected candidates land, so that
    writes need no data-dependent indexing.
    """

    def __init__(self, items: int, beam_size: int, max_len: int, alpha: float, early_stopping: bool, device):
        self.beam_size = beam_size
        self.alpha = alpha
        self.early_stopping = early_stopping
        slots = beam_size + 1
        self.score = torch.zeros(items, slots, dtype=torch.float64, device=device)
        # Empty slots sort after every stamp.
        self.stamp = torch.full((items, slots), torch.iinfo(torch.long).max, dtype=torch.long, device=device)
        self.length = torch.zeros(items, slots, dtype=torch.long, device=device)
        self.tokens = torch.full((items, slots, max_len), PAD_IDX, dtype=torch.long, device=device)
        self.count = torch.zeros(items, dtype=torch.long, device=device)
        self.clock = 0  # the next insertion stamp

    def penalty(self, length: int) -> float:
        # A Python int ** float, as CoMER computes it, so that scores are bitwise equal.
        return length**self.alpha

    def add(self, items: Tensor, sums: Tensor, offered: Tensor, rows: Tensor, tokens: Tensor, length: int) -> None:
        """Offer candidates to the lists of `items` [N] (distinct item ids).

        sums [N, m]: sum of log-probabilities of each candidate, in non-increasing order
        along m (a top-k's order); offered [N, m] bool: which candidates are added;
        rows [N, m]: the row of `tokens` [rows, >= length] holding each candidate's
        tokens, start token included; all candidates have `length` tokens.

        Same result as adding the offered candidates one by one in order to CoMER's
        list. Because they come best first, a newcomer never evicts an earlier
        newcomer, and once one is rejected so are the rest; so the k-th newcomer that
        finds the list full is kept iff it beats the k-th worst old entry (ties: oldest
        first), and replaces that entry.
        """
        n, m = sums.shape
        beam = self.beam_size
        score = sums.double() / self.penalty(length)
        order = torch.sort((~offered).to(torch.uint8), dim=1, stable=True).indices  # offered first, in order
        score, rows = score.gather(1, order), rows.gather(1, order)
        num_offered = offered.sum(dim=1, keepdim=True)
        kept = self.count[items][:, None]
        fill = torch.minimum(num_offered, beam - kept)

        slot_ids = torch.arange(beam, device=sums.device)
        old_score = self.score[items, :beam].masked_fill(slot_ids >= kept, float("inf"))
        by_stamp = self.stamp[items, :beam].argsort(dim=1, stable=True)
        worst_first = by_stamp.gather(1, old_score.gather(1, by_stamp).argsort(dim=1, stable=True))

        j = torch.arange(m, device=sums.device)[None]
        nth_eviction = (j - fill).clamp(0, beam - 1)
        victim = worst_first.gather(1, nth_eviction)
        beats_victim = score > old_score.gather(1, victim)
        accepted = (j < fill) | ((j < num_offered) & beats_victim)
        slot = torch.where(j < fill, kept + j, victim).masked_fill(~accepted, beam)

        flat = (items[:, None] * (beam + 1) + slot).view(-1)
        self.score.view(-1)[flat] = score.view(-1)
        self.stamp.view(-1)[flat] = (self.clock + j).expand(n, m).reshape(-1)
        self.length.view(-1)[flat] = length
        self.tokens.view(-1, self.tokens.shape[2])[flat, :length] = tokens[rows.view(-1), :length]
        self.count[items] = (kept + fill).view(-1)
        self.clock += m

    def is_done(self, items: Tensor, best_running: Tensor, cur_len: int) -> Tensor:
        """CoMER's test per item: list full and (early stopping, or the best running beam
        score / cur_len**alpha does not beat the worst kept score)."""
        full = self.count[items] == self.beam_size
        if self.early_stopping:
            return full
        worst = self.score[items, : self.beam_size].min(dim=1).values
        return full & (worst >= best_running.double() / self.penalty(cur_len))

    def results(self) -> Tuple[List[List[int]], Tensor]:
        """Every item's list in insertion order, items in turn: (hypotheses without their
        start token, float32 scores as CoMER stores them). One host transfer."""
        order = self.stamp[:, : self.beam_size].argsort(dim=1)
        count, order = self.count.tolist(), order.tolist()
        tokens, length, score = self.tokens.cpu(), self.length.tolist(), self.score.cpu()
        hyps, scores = [], []
        for item, slots in enumerate(order):
            for slot in slots[: count[item]]:
                hyps.append(tokens[item, slot, 1 : length[item][slot]].tolist())
                scores.append(score[item, slot])
        device = self.score.device
        return hyps, torch.stack(scores).to(torch.float32).to(device) if scores else torch.zeros(0, device=device)
