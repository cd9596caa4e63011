"""The first pass's static buffers with searches that join and leave while the others run:
`SearchSlots` whose item slots are filled one at a time (`insert`), at any step.

A search that joins at step t starts at position t of the decoding state (PAD before it;
`DecodingState.insert`), so its length is the state's position + 1 - its start: the beam
scorer and the finished lists take one length per item. The fused scorer kernel reads one
length for all items, so these slots score with the torch backend of the scorer, on every
device (the scheduler's plan says so: `Scheduler` refuses a request forcing it elsewhere).
"""
import torch
from torch import Tensor

from ..ops.beam_scorer_step.custom_op import beam_scorer_step_op
from ..search.search_slots import SearchSlots
from ..vocab import EOS_IDX, SOS_IDX


class InFlightSlots(SearchSlots):
    """SearchSlots (one decoding-state slot of beam_size rows per item = image x direction)
    whose items start one by one at step boundaries. A slot that no search holds is done
    (skipped by the cross-attention step, adding nothing to any list); its rows keep the
    finite caches of the last search there, which a search inserted later never reads
    (PAD positions, weighed 0)."""

    def insert(self, item: int, feature: Tensor, mask: Tensor, forward: bool) -> None:
        """A new search in slot `item`, from the current step: feature [h, w, d] and mask
        [h, w] are its image's encoder output (at most the state's feature size), forward
        its direction (True: left to right)."""
        start, end = (SOS_IDX, EOS_IDX) if forward else (EOS_IDX, SOS_IDX)
        device = self.done.device
        self.state.insert(item, feature, mask, torch.full((self.beam_size,), start, device=device))
        self.end_token[item] = end
        self.item_ids[item] = item
        # only the first beam may extend at the first step, as CoMER's search starts from one row
        self.beam_scores[item] = float("-inf")
        self.beam_scores[item, 0] = 0.0
        self.finished.clear(torch.tensor([item], device=device))
        self.done[item] = False

    def stop(self, item: int) -> None:
        """The search in slot `item` adds nothing more (it ended or was cancelled): the slot is free."""
        self.done[item] = True
        self.item_ids[item] = -1

    def item_positions(self) -> Tensor:
        """The index of each search's newest token, from its own start: [items]."""
        state = self.state
        return state.position - state.first_position.view(self.items, self.beam_size)[:, 0]

    def score(self, logits: Tensor):
        """The beam scorer's step with each search's own length (the plan's torch scorer)."""
        return beam_scorer_step_op(logits, self.temperature, self.beam_scores, self.done, self.end_token, self.finished,
                                   self.state.tokens, self.item_positions(), backend=self.state.plan["beam_scorer_step"])
