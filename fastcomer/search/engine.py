"""The fast decoding engine: CoMER's beam search with the same answers as
`reference_beam_search`, over the incremental decoder of `state.py`.

A step is device work only, on static buffers: one decoder step for every row, then the
beam scorer vectorised over items and candidates (top-k, end tokens of both directions,
the finished lists, done flags), then one gather that reorders the state and the append
of the next tokens. On CUDA it is replayed as CUDA graphs (`graphs.py`). The host reads
the done flags every `sync_every` steps (every step without graphs): it stops when every
search is done, and when enough searches are done it moves the live ones to a batch of fewer
slots (a power of two of them with graphs, so that few graphs serve every size).
Done searches' rows stay until then, frozen out of the finished lists (the fused
kernels skip them).
"""
import collections
import weakref
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend as backends
from ..ops.decode_step_dispatch import tensors_stamp
from ..vocab import EOS_IDX, PAD_IDX, SOS_IDX
from .common import BeamSearchOutput, Hypothesis, check_search_args, rescore, select_best
from .graphs import StepGraphs
from .scorer import FinishedLists
from .state import DecodingState, prefix_window

# Which searches run per image: True = left to right (SOS ... EOS), False = right to left.
DIRECTIONS = {"both": (True, False), "l2r": (True,), "r2l": (False,)}
# With CUDA graphs the host looks at the done flags every this many steps: a sync drains the
# GPU's queue, so it is rare; the cost is up to this many steps run after the last search ends.
GRAPH_SYNC_EVERY = 8
# Batches (their buffers and graphs) kept per decoder for later searches of the same shapes.
GRAPH_CACHE_SIZE = 8


def search_directions(direction: str, allowed: Sequence[str] = tuple(DIRECTIONS)) -> Tuple[bool, ...]:
    if direction not in allowed:
        raise ValueError(f"direction must be one of {', '.join(map(repr, allowed))}, got {direction!r}")
    return DIRECTIONS[direction]


class BeamBatch:
    """The first pass's static buffers for `items` searches (item = image x direction), one
    decoding-state slot of beam_size rows each: the decoding state and the scorer's buffers
    (per item: beam scores, done flag, finished list, and its place in the output order, -1
    for a filler slot)."""

    def __init__(self, decoder, items: int, l2r: Tuple[bool, ...], beam_size: int, max_len: int, alpha: float,
                 early_stopping: bool, temperature: float, height: int, width: int, dtype, device,
                 backend: Optional[str], graphs: bool):
        self.l2r, self.items, self.beam_size, self.temperature = l2r, items, beam_size, temperature
        self.state = DecodingState(decoder, items, beam_size, height, width, max_len, dtype, device, backend)
        self.finished = FinishedLists(items, beam_size, max_len, alpha, early_stopping, device)
        self.end_token = torch.full((items,), EOS_IDX, device=device)
        self.item_ids = torch.full((items,), -1, dtype=torch.long, device=device)
        # CoMER starts the beam scores as float32 zeros; adding the log-probabilities promotes them.
        self.beam_scores = torch.zeros(items, beam_size, dtype=torch.promote_types(dtype, torch.float32), device=device)
        self.done = torch.ones(items, dtype=torch.bool, device=device)
        self.run = StepGraphs(self.step, graphs)

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

    def take(self, other: "BeamBatch", items: List[int]) -> None:
        """Continue other's searches in its slots `items` (the remaining slots are fillers)."""
        device = self.done.device
        source = torch.tensor(items + items[:1] * (self.items - len(items)), device=device)
        filler = torch.arange(self.items, device=device) >= len(items)
        self.state.take(other.state, source)
        self.end_token.copy_(other.end_token[source])
        self.item_ids.copy_(other.item_ids[source].masked_fill(filler, -1))
        self.done.copy_(other.done[source] | filler)
        self.beam_scores.copy_(other.beam_scores[source])
        self.finished.clear()
        self.finished.copy_items(other.finished, source, torch.arange(self.items, device=device))

    def step(self, window: int) -> None:
        """One step of every search: device work only, the same for every call of a window."""
        state, beam = self.state, self.beam_size
        length = state.position + 1  # tokens per row so far
        state.skip_slots(self.done)
        logits = state.step(window)
        scores = F.log_softmax(logits / self.temperature, dim=-1) + self.beam_scores.view(-1, 1)
        vocab_size = logits.shape[1]
        top_scores, top_ids = scores.view(self.items, -1).topk(2 * beam, dim=1)
        rows = torch.arange(self.items, device=logits.device)[:, None] * beam + top_ids // vocab_size
        tokens = top_ids % vocab_size
        ends = tokens == self.end_token[:, None]
        # Ended candidates ranked below beam_size are dropped, as CoMER does; done items add none.
        offered = ends[:, :beam] & ~self.done[:, None]
        self.finished.add(top_scores[:, :beam], offered, rows[:, :beam], state.tokens, length)
        # The next beams: the first beam_size candidates that do not end, in rank order.
        keep = torch.sort(ends.to(torch.uint8), dim=1, stable=True).indices[:, :beam]
        self.beam_scores.copy_(top_scores.gather(1, keep))
        self.done |= self.finished.is_done(self.beam_scores.max(dim=1).values, length)
        state.reorder(rows.gather(1, keep).view(-1), window)
        state.append(tokens.gather(1, keep).view(-1))

    def finish(self) -> None:
        """max_len reached: the searches not done add all their beams."""
        rows = torch.arange(self.state.rows, device=self.done.device).view(self.items, self.beam_size)
        offered = (~self.done)[:, None].expand(-1, self.beam_size)
        self.finished.add(self.beam_scores, offered, rows, self.state.tokens, self.state.position + 1)

    def live_items(self) -> List[int]:
        """Slots whose search is not done (a host sync)."""
        return [slot for slot, done in enumerate(self.done.tolist()) if not done]

    def store(self, lists: FinishedLists) -> None:
        """Copy the finished lists of the real items into `lists`, indexed by output order."""
        real = (self.item_ids >= 0).nonzero().view(-1)
        lists.copy_items(self.finished, real, self.item_ids[real])


_graph_batches: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def batch_factory(decoder, settings: tuple, graphs: bool):
    """BeamBatch by number of item slots, for one search. With graphs, batches (and their captured
    graphs) are kept for later searches of the same settings, as long as the decoder's
    tensors stay where they are, unchanged: a graph reads its tensors by address, and the
    folded ARM and prepared kernel weights it holds were computed from their values."""
    if not graphs:
        return lambda items: BeamBatch(decoder, items, *settings, graphs=False)
    fingerprint = tensors_stamp((*decoder.parameters(), *decoder.buffers()))
    cache = _graph_batches.get(decoder)
    if cache is None or cache[0] != fingerprint:
        cache = (fingerprint, collections.OrderedDict())
        _graph_batches[decoder] = cache
    batches = cache[1]

    def get(items: int) -> BeamBatch:
        key = (items, settings)
        if key not in batches:
            # a weak proxy: the cache, keyed weakly on the decoder, must not keep it alive
            batches[key] = BeamBatch(weakref.proxy(decoder), items, *settings, graphs=True)
            while len(batches) > GRAPH_CACHE_SIZE:
                batches.popitem(last=False)
        batches.move_to_end(key)
        return batches[key]
    return get


def first_pass(
    decoder, feature: Tensor, mask: Tensor, beam_size: int, max_len: int, alpha: float, early_stopping: bool,
    temperature: float, l2r: Tuple[bool, ...], backend: Optional[str] = None, graphs: Optional[bool] = None,
) -> Tuple[List[List[int]], Tensor]:
    """The beam searches of every image in the given directions. Returns the finished
    lists, item after item (all images' first direction, then the second), hypotheses
    without their start token, and their float32 scores, as `reference._first_pass`."""
    batch, h, w, _ = feature.shape
    graphs = backends.use_cuda_graphs(feature.device, graphs)
    backend = backends.resolve(feature, backend, cuda_available=backends.cuda_extension_usable())
    settings = (l2r, beam_size, max_len, alpha, early_stopping, temperature, h, w, feature.dtype, feature.device, backend)
    make_batch = batch_factory(decoder, settings, graphs)
    slots = (lambda n: 1 << (n - 1).bit_length()) if graphs else (lambda n: n)
    sync_every = GRAPH_SYNC_EVERY if graphs else 1

    results = FinishedLists(batch * len(l2r), beam_size, max_len, alpha, early_stopping, feature.device)
    current = make_batch(slots(batch * len(l2r)))
    current.start(feature, mask)
    length = 1  # tokens per row
    while length < max_len:
        current.run(prefix_window(length, max_len))
        length += 1
        if length == max_len or length % sync_every:
            continue
        live = current.live_items()
        if not live:
            break
        if slots(len(live)) < current.items:
            current.store(results)
            smaller = make_batch(slots(len(live)))
            smaller.take(current, live)
            current = smaller
    if length == max_len:
        current.finish()
    current.store(results)
    return results.results()


@torch.inference_mode()
def beam_search(
    model,
    img: Tensor,
    img_mask: Tensor,
    beam_size: int = 10,
    max_len: int = 200,
    alpha: float = 1.0,
    early_stopping: bool = False,
    temperature: float = 1.0,
    return_details: bool = False,
    direction: str = "both",
    backend: Optional[str] = None,
    graphs: Optional[bool] = None,
) -> Union[List[Hypothesis], BeamSearchOutput]:
    """CoMER's beam search (SPEC section 3), the same answers as `reference_beam_search`.

    img [b, 1, H, W], img_mask [b, H, W] (True = padding); the model must be in eval mode.
    direction "both" is CoMER's bidirectional search with rescoring by the opposite
    direction; "l2r" or "r2l" runs that direction's searches alone, without rescoring:
    each image's answer is its best first-pass hypothesis (first maximum wins) and
    BeamSearchOutput.rescore is None. backend picks the cross-attention step: 'auto' (the
    fused kernels for CUDA float32/16/bf16 models), 'cuda', 'triton' or 'torch'; None reads
    FASTCOMER_BACKEND. The kernels compute the same function in float32 arithmetic, so
    answers equal the reference's up to float32 near-ties. graphs: replay the steps as CUDA
    graphs (same results, less launch overhead); None reads FASTCOMER_CUDA_GRAPHS, whose
    default `auto` means on for models on CUDA.
    """
    check_search_args(model, img, img_mask, beam_size, max_len, temperature)
    l2r = search_directions(direction)
    feature, mask = model.encoder(img, img_mask)
    hyps, scores = first_pass(
        model.decoder, feature, mask, beam_size, max_len, alpha, early_stopping, temperature, l2r, backend, graphs
    )
    batch = feature.shape[0]
    if len(l2r) == 1:
        best = select_best(hyps, scores, batch, beam_size, l2r)
        return BeamSearchOutput(best, hyps, scores, None) if return_details else best
    reverse = rescore(model.decoder, feature, mask, hyps, beam_size, alpha, temperature)
    best = select_best(hyps, scores + reverse, batch, beam_size)
    return BeamSearchOutput(best, hyps, scores, reverse) if return_details else best


@torch.inference_mode()
def greedy_search(
    model,
    img: Tensor,
    img_mask: Tensor,
    max_len: int = 200,
    alpha: float = 1.0,
    temperature: float = 1.0,
    direction: str = "l2r",
    backend: Optional[str] = None,
) -> List[Hypothesis]:
    """Per image the most likely token at every step, in one direction ("l2r" or "r2l"),
    until the end token or max_len tokens (start token included).

    Score: sum of the chosen tokens' log-probabilities (end token included) / len**alpha,
    len counting the start token but not the end token, as a beam hypothesis's.
    backend: as beam_search's.
    """
    check_search_args(model, img, img_mask, 1, max_len, temperature)
    (forward,) = search_directions(direction, ("l2r", "r2l"))
    start, end = (SOS_IDX, EOS_IDX) if forward else (EOS_IDX, SOS_IDX)
    feature, mask = model.encoder(img, img_mask)
    batch, h, w, _ = feature.shape
    state = DecodingState(model.decoder, batch, 1, h, w, max_len, feature.dtype, feature.device, backend)
    state.start(feature, mask, torch.full((batch,), start, device=feature.device))
    sums = feature.new_zeros(batch)
    ended = torch.zeros(batch, dtype=torch.bool, device=feature.device)
    lengths = torch.full((batch,), max_len, device=feature.device)
    length = 1  # tokens per row
    while length < max_len:
        logits = state.step(prefix_window(length, max_len))
        logprobs, tokens = F.log_softmax(logits / temperature, dim=-1).max(dim=1)
        sums += logprobs.masked_fill(ended, 0.0)
        ends_now = (tokens == end) & ~ended
        lengths.masked_fill_(ends_now, length)
        ended |= ends_now
        if bool(ended.all()):  # the step's one host sync
            break
        state.append(tokens.masked_fill(ended, PAD_IDX))
        length += 1
    answers = []
    for row, (total, length) in enumerate(zip(sums.tolist(), lengths.tolist())):
        seq = state.tokens[row, 1:length].tolist()
        answers.append(Hypothesis(seq if forward else seq[::-1], total / length**alpha))
    return answers
