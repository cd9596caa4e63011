"""The fast decoding engine: CoMER's beam search with the same answers as
`reference_beam_search`, over the incremental decoder of `state.py`.

Per step: one decoder step for the live rows, then the beam scorer on the device,
vectorised over items and candidates (top-k, end tokens of both directions, the
finished lists, done flags), then one gather that reorders the state. The only host
sync of a step reads the done flags; images whose searches are all done leave the batch.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..vocab import EOS_IDX, PAD_IDX, SOS_IDX
from .common import BeamSearchOutput, Hypothesis, check_search_args, rescore, select_best
from .scorer import FinishedLists
from .state import DecodingState

# Which searches run per image: True = left to right (SOS ... EOS), False = right to left.
DIRECTIONS = {"both": (True, False), "l2r": (True,), "r2l": (False,)}


def search_directions(direction: str, allowed: Sequence[str] = tuple(DIRECTIONS)) -> Tuple[bool, ...]:
    if direction not in allowed:
        raise ValueError(f"direction must be one of {', '.join(map(repr, allowed))}, got {direction!r}")
    return DIRECTIONS[direction]


def live_layout(live: List[Tuple[int, int]], directions: int, beam_size: int):
    """Row order for the live items (image, direction): images with every direction live
    first, as one segment of directions*beam_size rows per image, then those with fewer,
    beam_size rows per item. Returns the items in their new order and the state layout."""
    images = list(dict.fromkeys(image for image, _ in live))
    live_directions = {image: [d for i, d in live if i == image] for image in images}
    both = [image for image in images if len(live_directions[image]) == directions]
    some = [image for image in images if len(live_directions[image]) < directions]
    new_items = [(image, d) for image in both + some for d in live_directions[image]]
    layout = [(group, n * beam_size) for group, n in ((both, directions), (some, 1)) if group]
    return new_items, layout


def first_pass(
    decoder, feature: Tensor, mask: Tensor, beam_size: int, max_len: int, alpha: float,
    early_stopping: bool, temperature: float, l2r: Tuple[bool, ...], backend: Optional[str] = None,
) -> Tuple[List[List[int]], Tensor]:
    """The beam searches of every image in the given directions. Returns the finished
    lists, item after item (all images' first direction, then the second), hypotheses
    without their start token, and their float32 scores, as `reference._first_pass`."""
    batch, device = feature.shape[0], feature.device
    directions = len(l2r)
    vocab_size = decoder.proj.out_features
    state = DecodingState(decoder, feature, mask, batch * directions * beam_size, max_len, backend)

    # Live items (image, direction) in row order, each beam_size rows (one at the first
    # step); item_ids are their places in the output order (direction by direction, image
    # by image). A search leaves the batch as soon as it is done (see live_layout), so
    # every item in the batch is live.
    items = [(image, d) for image in range(batch) for d in range(directions)]
    state.set_layout([(list(range(batch)), directions)])
    forward = torch.tensor([l2r[d] for _, d in items], device=device)
    item_ids = torch.tensor([d * batch + image for image, d in items], device=device)
    end_token = torch.where(forward, EOS_IDX, SOS_IDX)
    state.append(torch.where(forward, SOS_IDX, EOS_IDX))
    finished = FinishedLists(directions * batch, beam_size, max_len, alpha, early_stopping, device)
    done = torch.zeros(directions * batch, dtype=torch.bool, device=device)
    beam_scores = torch.zeros(directions * batch, dtype=torch.float32, device=device)  # as CoMER starts them
    rows_per_item = 1  # the first step expands each item's one row

    while state.length < max_len:
        cur_len = state.length
        scores = F.log_softmax(state.step() / temperature, dim=-1) + beam_scores[:, None]
        top_scores, top_ids = scores.view(len(items), -1).topk(2 * beam_size, dim=1)
        rows = torch.arange(len(items), device=device)[:, None] * rows_per_item + top_ids // vocab_size
        tokens = top_ids % vocab_size
        ends = tokens == end_token[:, None]
        # Ended candidates ranked below beam_size are dropped, as CoMER does.
        finished.add(item_ids, top_scores[:, :beam_size], ends[:, :beam_size], rows[:, :beam_size], state.tokens, cur_len)
        # The next beams: the first beam_size candidates that do not end, in rank order.
        keep = torch.sort(ends.to(torch.uint8), dim=1, stable=True).indices[:, :beam_size]
        beam_scores, next_tokens, parents = top_scores.gather(1, keep), tokens.gather(1, keep), rows.gather(1, keep)
        done[item_ids] = finished.is_done(item_ids, beam_scores.max(dim=1).values, cur_len)

        done_now = done.tolist()  # the step's one host sync
        if all(done_now):
            break
        live = [(image, d) for image, d in items if not done_now[d * batch + image]]
        if live != items or cur_len == 1:  # a search finished, or the first step's rows become beams
            new_items, layout = live_layout(live, directions, beam_size)
            place = {item: p for p, item in enumerate(items)}
            moved = torch.tensor([place[item] for item in new_items], device=device)
            beam_scores, next_tokens, parents = beam_scores[moved], next_tokens[moved], parents[moved]
            item_ids, end_token, items = item_ids[moved], end_token[moved], new_items
            state.reorder(parents.view(-1), layout)  # parents index the rows of the old layout
        else:
            state.reorder(parents.view(-1))
        state.append(next_tokens.view(-1))
        beam_scores = beam_scores.view(-1)
        rows_per_item = beam_size

    if state.length == max_len:  # max_len reached: the unfinished items add all their beams
        rows = torch.arange(len(items) * beam_size, device=device).view(len(items), beam_size)
        offered = torch.ones(len(items), beam_size, dtype=torch.bool, device=device)
        finished.add(item_ids, beam_scores.view(len(items), beam_size), offered, rows, state.tokens, max_len)
    return finished.results()


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
) -> Union[List[Hypothesis], BeamSearchOutput]:
    """CoMER's beam search (SPEC section 3), the same answers as `reference_beam_search`.

    img [b, 1, H, W], img_mask [b, H, W] (True = padding); the model must be in eval mode.
    direction "both" is CoMER's bidirectional search with rescoring by the opposite
    direction; "l2r" or "r2l" runs that direction's searches alone, without rescoring:
    each image's answer is its best first-pass hypothesis (first maximum wins) and
    BeamSearchOutput.rescore is None. backend picks the cross-attention step: 'auto' (the
    fused kernels for CUDA float32/16/bf16 models), 'cuda', 'triton' or 'torch'; None reads
    FASTCOMER_BACKEND. The kernels compute the same function in float32 arithmetic, so
    answers equal the reference's up to float32 near-ties.
    """
    check_search_args(model, img, img_mask, beam_size, max_len, temperature)
    l2r = search_directions(direction)
    feature, mask = model.encoder(img, img_mask)
    hyps, scores = first_pass(
        model.decoder, feature, mask, beam_size, max_len, alpha, early_stopping, temperature, l2r, backend
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
    batch = feature.shape[0]
    state = DecodingState(model.decoder, feature, mask, batch, max_len, backend)
    state.set_layout([(list(range(batch)), 1)])
    state.append(torch.full((batch,), start, device=feature.device))
    sums = feature.new_zeros(batch)
    ended = torch.zeros(batch, dtype=torch.bool, device=feature.device)
    lengths = torch.full((batch,), max_len, device=feature.device)
    while state.length < max_len:
        logprobs, tokens = F.log_softmax(state.step() / temperature, dim=-1).max(dim=1)
        sums += logprobs.masked_fill(ended, 0.0)
        ends_now = (tokens == end) & ~ended
        lengths.masked_fill_(ends_now, state.length)
        ended |= ends_now
        if bool(ended.all()):  # the step's one host sync
            break
        state.append(tokens.masked_fill(ended, PAD_IDX))
    answers = []
    for row, (total, length) in enumerate(zip(sums.tolist(), lengths.tolist())):
        seq = state.tokens[row, 1:length].tolist()
        answers.append(Hypothesis(seq if forward else seq[::-1], total / length**alpha))
    return answers
