"""CoMER's finished-hypothesis lists (docs/function.md, 'Beam search') as device tensors,
vectorised over items.

`fastcomer.search.reference.FinishedHypotheses` is the per-item Python original; this computes the same
lists for all items at once with static shapes and no host sync (the step counter, the
length penalty and the insertion clock live on the device), so that a whole beam step can
be captured in a CUDA graph.
"""
import math
import sys
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...vocab import PAD_IDX

FIELDS = ("score", "stamp", "length", "tokens", "count")
# Every tensor of the lists' state: the fields, the insertion clock and the length penalties.
STATE = FIELDS + ("clock", "penalty")


def length_penalty(length: int, alpha: float) -> float:
    """length**alpha as CoMER computes it (a float power: scores bitwise its), kept in
    (0, inf] so that every finite alpha searches to the end: a large alpha overflows to inf
    (the score is then -0.0) instead of raising, a large negative one stays above 0 (the score
    is then very negative) instead of dividing by zero."""
    try:
        return max(length ** float(alpha), sys.float_info.min)
    except OverflowError:
        return math.inf


class FinishedLists:
    """For each of `items` searches, its n-best list of ended hypotheses.

    Slot s < beam_size of item i holds one kept hypothesis: its score
    sum_logprob / len**alpha (float64, as CoMER's Python floats), an insertion stamp
    (the list's order and the eviction tie-break), its tokens (max_len wide, PAD after
    its length) and length. Filled slots are always 0..count-1: a new entry either fills
    the next slot or replaces the one it evicts. Slot beam_size is a write-off slot where
    rejected candidates land, so that writes need no data-dependent indexing.
    """

    def __init__(self, items: int, beam_size: int, max_len: int, alpha: float, early_stopping: bool, device):
        self.beam_size = beam_size
        self.early_stopping = early_stopping
        slots = beam_size + 1
        self.score = torch.zeros(items, slots, dtype=torch.float64, device=device)
        self.stamp = torch.zeros(items, slots, dtype=torch.long, device=device)
        self.length = torch.zeros(items, slots, dtype=torch.long, device=device)
        self.tokens = torch.zeros(items, slots, max_len, dtype=torch.long, device=device)
        self.count = torch.zeros(items, dtype=torch.long, device=device)
        self.clock = torch.zeros((), dtype=torch.long, device=device)  # the next insertion stamp
        # Index = length; a hypothesis holds its start token, so length 0 never occurs (and 0**alpha
        # would divide by zero for a negative alpha): its entry is a placeholder.
        self.penalty = torch.tensor([1.0] + [length_penalty(n, alpha) for n in range(1, max_len + 1)], dtype=torch.float64,
                                    device=device)
        self.clear()

    @classmethod
    def over(cls, state: Sequence[Tensor], early_stopping: bool) -> "FinishedLists":
        """Lists whose state (the tensors named in STATE, in that order) is `state`: updates
        write into those tensors (the beam scorer's custom op rebuilds its lists so)."""
        if len(state) != len(STATE):
            raise ValueError(f"finished lists: {len(STATE)} state tensors ({', '.join(STATE)}) expected, got {len(state)}")
        lists = cls.__new__(cls)
        for name, tensor in zip(STATE, state):
            setattr(lists, name, tensor)
        lists.beam_size, lists.early_stopping = lists.score.shape[1] - 1, early_stopping
        return lists

    def state(self) -> Tuple[Tensor, ...]:
        """The tensors named in STATE, in that order."""
        return tuple(getattr(self, name) for name in STATE)

    def clear(self, items: Optional[Tensor] = None) -> None:
        """Empty every list, or those of `items` (an index tensor: searches that start in
        slots of a running set), in place."""
        lists = slice(None) if items is None else items
        self.score[lists] = 0.0
        self.stamp[lists] = torch.iinfo(torch.long).max  # empty slots sort after every stamp
        self.length[lists] = 0
        self.tokens[lists] = PAD_IDX
        self.count[lists] = 0
        if items is None:
            self.clock.zero_()

    def penalty_of(self, length: Tensor) -> Tensor:
        """length**alpha: [1] for a 0-dim length, [items] for one length per item."""
        # index_select, not penalty[length]: indexing with a 0-dim tensor reads it on the host.
        return self.penalty.index_select(0, length.view(-1))

    def add(self, sums: Tensor, offered: Tensor, rows: Tensor, tokens: Tensor, length: Tensor) -> None:
        """Offer candidates to every item's list.

        sums [items, m]: sum of log-probabilities of each candidate, in non-increasing
        order along m (a top-k's order); offered [items, m] bool: which candidates are
        added; rows [items, m]: the row of `tokens` [rows, max_len] holding each
        candidate's tokens, start token included, PAD after them; length: a 0-dim long
        tensor, the candidates' number of tokens, or [items], each item's (searches that joined
        a running set at different steps: their tokens start later, see `results`).

        Same result as adding the offered candidates one by one in order to CoMER's
        list. Because they come best first, a newcomer never evicts an earlier
        newcomer, and once one is rejected so are the rest; so the k-th newcomer that
        finds the list full is kept iff it beats the k-th worst old entry (ties: oldest
        first), and replaces that entry.
        """
        n, m = sums.shape
        beam = self.beam_size
        score = sums.double() / self.penalty_of(length)[:, None]
        order = torch.sort((~offered).to(torch.uint8), dim=1, stable=True).indices  # offered first, in order
        score, rows = score.gather(1, order), rows.gather(1, order)
        num_offered = offered.sum(dim=1, keepdim=True)
        kept = self.count[:, None]
        fill = torch.minimum(num_offered, beam - kept)

        slot_ids = torch.arange(beam, device=sums.device)
        old_score = self.score[:, :beam].masked_fill(slot_ids >= kept, float("inf"))
        by_stamp = self.stamp[:, :beam].argsort(dim=1, stable=True)
        worst_first = by_stamp.gather(1, old_score.gather(1, by_stamp).argsort(dim=1, stable=True))

        j = torch.arange(m, device=sums.device)[None]
        nth_eviction = (j - fill).clamp(0, beam - 1)
        victim = worst_first.gather(1, nth_eviction)
        beats_victim = score > old_score.gather(1, victim)
        accepted = (j < fill) | ((j < num_offered) & beats_victim)
        slot = torch.where(j < fill, kept + j, victim).masked_fill(~accepted, beam)

        flat = (torch.arange(n, device=sums.device)[:, None] * (beam + 1) + slot).view(-1)
        self.score.view(-1)[flat] = score.view(-1)
        self.stamp.view(-1)[flat] = (self.clock + j).expand(n, m).reshape(-1)
        self.length.view(-1)[flat] = length.view(-1, 1).expand(n, m).reshape(-1)
        self.tokens.view(-1, self.tokens.shape[2])[flat] = tokens[rows.view(-1)]
        self.count.copy_((kept + fill).view(-1))
        self.clock += m

    def is_done(self, best_running: Tensor, length: Tensor) -> Tensor:
        """CoMER's test per item: list full and (early stopping, or the best running beam
        score / length**alpha does not beat the worst kept score)."""
        full = self.count == self.beam_size
        if self.early_stopping:
            return full
        worst = self.score[:, : self.beam_size].min(dim=1).values
        return full & (worst >= best_running.double() / self.penalty_of(length))

    def copy_items(self, source: "FinishedLists", source_items: Tensor, items: Tensor, shift: int = 0) -> None:
        """Lists items[k] := source's lists source_items[k]; later stamps stay later. Their
        tokens from position `shift` on (as many as this one holds, source's may be longer),
        for searches whose tokens move `shift` positions to the front (`DecodingState.take`)."""
        for name in FIELDS:
            value = getattr(source, name)[source_items]
            if name == "tokens":
                positions = min(self.tokens.shape[2], value.shape[2] - shift)
                self.tokens[items] = PAD_IDX
                self.tokens[items, :, :positions] = value[:, :, shift : shift + positions]
            else:
                getattr(self, name)[items] = value
        torch.maximum(self.clock, source.clock, out=self.clock)

    def results(self, items: Optional[Sequence[int]] = None,
                starts: Optional[Sequence[int]] = None) -> Tuple[List[List[int]], Tensor]:
        """Every item's list (or those of `items`, in that order) in insertion order, items in
        turn: (hypotheses without their start token, float32 scores as CoMER stores them). One
        host transfer. starts: the position of each item's start token in its tokens (0 when
        None; a search that joined a running set starts later)."""
        items = range(self.count.shape[0]) if items is None else list(items)
        starts = [0] * len(items) if starts is None else list(starts)
        index = torch.tensor(items, dtype=torch.long, device=self.count.device)
        order = self.stamp[index, : self.beam_size].argsort(dim=1)
        count, order = self.count[index].tolist(), order.tolist()
        tokens, length, score = self.tokens[index].cpu(), self.length[index].tolist(), self.score[index].cpu()
        hyps, scores = [], []
        for k, (slots, start) in enumerate(zip(order, starts)):
            for slot in slots[: count[k]]:
                hyps.append(tokens[k, slot, start + 1 : start + length[k][slot]].tolist())
                scores.append(score[k, slot])
        device = self.score.device
        return hyps, torch.stack(scores).to(torch.float32).to(device) if scores else torch.zeros(0, device=device)
