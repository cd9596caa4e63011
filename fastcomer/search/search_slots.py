"""The first pass's static buffers for a set of searches, and one beam step over them.

A step is device work only, on static buffers: one decoder step for every row, then the
beam scorer vectorised over items and candidates (`ops.beam_scorer_step`: top-k, end tokens of
both directions, the finished lists, done flags; one kernel on the kernel backends), then one gather that reorders the state and the append
of the next tokens; so it can be replayed as a CUDA graph (`cuda_graphs.py`).
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..ops.beam_scorer_step import FinishedLists
from ..ops.beam_scorer_step.custom_op import beam_scorer_step_op
from ..ops.dispatch import DispatchPlan
from ..vocab import EOS_IDX, SOS_IDX
from .cuda_graphs import StepGraphs
from .decoding_state import DecodingState
from .options import SearchOptions


@dataclass(frozen=True)
class FeatureLayout:
    """What the encoder produced and how the step runs on it: the feature map's size, its
    dtype and device, and the search's dispatch plan."""

    height: int
    width: int
    dtype: torch.dtype
    device: torch.device
    plan: DispatchPlan


class SearchSlots:
    """The first pass's static buffers for `items` searches (item = image x direction), one
    decoding-state slot of beam_size rows each: the decoding state and the scorer's buffers
    (per item: beam scores, done flag, finished list, and its place in the output order, -1
    for a filler slot)."""

    def __init__(self, decoder, items: int, options: SearchOptions, features: FeatureLayout):
        self.l2r, self.items, self.beam_size, self.temperature = options.l2r, items, options.beam_size, options.temperature
        dtype, device = features.dtype, features.device
        self.state = DecodingState(decoder, items, options.beam_size, features.height, features.width, options.max_len,
                                   dtype, device, features.plan, fixed_addresses=features.plan.graphs)
        self.finished = FinishedLists(items, options.beam_size, options.max_len, options.alpha, options.early_stopping,
                                      device)
        self.end_token = torch.full((items,), EOS_IDX, device=device)
        self.item_ids = torch.full((items,), -1, dtype=torch.long, device=device)
        # CoMER starts the beam scores as float32 zeros; adding the log-probabilities promotes them.
        self.beam_scores = torch.zeros(items, options.beam_size, dtype=torch.promote_types(dtype, torch.float32), device=device)
        self.done = torch.ones(items, dtype=torch.bool, device=device)
        self.run = StepGraphs(self.step, features.plan.graphs, device=device)

    def start(self, feature: Tensor, mask: Tensor) -> None:
        """A new search of every image of feature [batch, h, w, d] in each direction: item
        d * batch + image in slot image * directions + d; slots past them are fillers (copies
        of the first item, done from the start)."""
        batch, directions, device = feature.shape[0], len(self.l2r), feature.device
        slot = torch.arange(self.items, device=device)
        real = slot < batch * directions
        image, direction = (slot // directions).masked_fill(~real, 0), (slot % directions).masked_fill(~real, 0)
        forward = torch.tensor(self.l2r, device=device)[direction]
        self.state.start(feature[image], mask[image], torch.where(forward, SOS_IDX, EOS_IDX).repeat_interleave(self.beam_size))
        self.end_token.copy_(torch.where(forward, EOS_IDX, SOS_IDX))
        self.item_ids.copy_(torch.where(real, direction * batch + image, -1))
        self.done.copy_(~real)
        # All beams of an item start as copies of its one start row: only the first may
        # extend at the first step, as CoMER's search starts from one row per item.
        self.beam_scores.fill_(float("-inf"))
        self.beam_scores[:, 0] = 0.0
        self.finished.clear()

    def take(self, other: "SearchSlots", items: List[int], shift: int = 0) -> None:
        """Continue other's searches in its slots `items` (the remaining slots are fillers);
        other's state may be of other sizes, its first `shift` positions dropped
        (`DecodingState.take`)."""
        device = self.done.device
        source = torch.tensor(items + items[:1] * (self.items - len(items)), device=device)
        filler = torch.arange(self.items, device=device) >= len(items)
        self.state.take(other.state, source, shift)
        self.end_token.copy_(other.end_token[source])
        self.item_ids.copy_(other.item_ids[source].masked_fill(filler, -1))
        self.done.copy_(other.done[source] | filler)
        self.beam_scores.copy_(other.beam_scores[source])
        self.finished.clear()
        self.finished.copy_items(other.finished, source, torch.arange(self.items, device=device), shift)

    def step(self, window: int) -> None:
        """One step of every search: device work only, the same for every call of a window."""
        state = self.state
        state.skip_slots(self.done)
        parents, next_tokens = self.score(state.step(window))
        state.reorder(parents, window)
        state.append(next_tokens)

    def score(self, logits: Tensor) -> Tuple[Tensor, Tensor]:
        """The beam scorer's step of every search (`ops.beam_scorer_step`): beam scores, done flags
        and finished lists updated in place; returns (parents, next_tokens) of the rows."""
        state = self.state
        return beam_scorer_step_op(logits, self.temperature, self.beam_scores, self.done, self.end_token, self.finished,
                                   state.tokens, state.position, backend=state.plan["beam_scorer_step"])

    def item_positions(self) -> Tensor:
        """The index of each search's newest token: one for all (0-dim), the searches having
        started together."""
        return self.state.position

    def finish(self, ending: Optional[Tensor] = None) -> None:
        """max_len reached: the searches not done (of those where ending [items] is True, or
        all) add all their beams."""
        rows = torch.arange(self.state.rows, device=self.done.device).view(self.items, self.beam_size)
        offered = ~self.done if ending is None else ending & ~self.done
        self.finished.add(self.beam_scores, offered[:, None].expand(-1, self.beam_size), rows, self.state.tokens,
                          self.item_positions() + 1)

    def live_items(self) -> List[int]:
        """Slots whose search is not done (a host sync)."""
        return [slot for slot, done in enumerate(self.done.tolist()) if not done]

    def store(self, lists: FinishedLists) -> None:
        """Copy the finished lists of the real items into `lists`, indexed by output order."""
        real = (self.item_ids >= 0).nonzero().view(-1)
        lists.copy_items(self.finished, real, self.item_ids[real])
