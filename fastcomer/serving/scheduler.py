"""In-flight batching: one thread decodes every request's beam searches in running batches
that requests join and leave at step boundaries, as LLM servers do.

A request (one image and its search settings) is encoded on its own (the encoder is not
exact under padding), joins the running set of its settings at the next step boundary (its
directions as slots of `InFlightSlots`), leaves it when its searches are done, is rescored
on its own and answered, while the others keep decoding. Images of different sizes share a
set: its decoder memory is the largest feature map, the others padded and masked, which
leaves the cross-attention and the ARM exact (the coverage outside an image is 0, as the
ARM convolution's own zero padding). So each answer is that of decoding the image alone
(`beam_search` of a batch of one), up to float32 rounding of sums of other lengths.

Settings that change the step for every row (beam size, alpha, temperature, early stopping,
directions) get running sets of their own, stepped in turn; max_len is per search. The
batch is bounded (images decoding at once, padded feature positions), admission is first in,
first out (a request waits for room rather than being passed by smaller ones, so none
starves), and a cancelled request's slots are freed at the next step boundary.
"""
import collections
import concurrent.futures
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..model.adapt import as_comer
from ..ops.dispatch import BackendRequest, DispatchPlan, decoding_plan, requested_for
from ..search.decoding_state import WINDOW_STEP, prefix_window
from ..search.first_pass import GRAPH_SYNC_EVERY
from ..search.hypotheses import Hypothesis
from ..search.options import SearchOptions, check_search_args
from ..search.rescoring import rescore, select_best
from ..search.search_slots import FeatureLayout
from ..search.threads import intra_op_threads, search_threads
from .slots import InFlightSlots

# The largest feature map of an image CoMER's preprocessing gives (256 x 1024 pixels / 16).
LARGEST_FEATURE_MAP = 16 * 64
# Free slots cost their rows' share of every step; a request that arrives while a search
# leaves reuses its slots, so they are kept this many steps before the state is compacted.
COMPACT_AFTER_STEPS = 2


class QueueFull(RuntimeError):
    """The scheduler's queue holds max_queue requests: try again later."""


class SchedulerClosed(RuntimeError):
    """The scheduler takes no more requests (closing, closed or failed)."""


@dataclass(eq=False)
class Request:
    """A submitted image: `future` gives its Hypothesis (or raises); `cancel()` gives up on it."""

    options: SearchOptions
    future: "concurrent.futures.Future[Hypothesis]"
    submitted: float  # time.monotonic()
    _scheduler: "Scheduler" = field(repr=False)
    _image: Optional[Tensor] = field(default=None, repr=False)  # until it is encoded
    _cancelled: bool = False

    def cancel(self) -> None:
        """Give up: a queued request is dropped, a running one's slots are freed at the next
        step boundary; the future is cancelled (unless it was answered already)."""
        self._cancelled = True
        self.future.cancel()  # a queued request's future is still pending
        self._scheduler._wake()

    def result(self, timeout: Optional[float] = None) -> Hypothesis:
        return self.future.result(timeout)


@dataclass(eq=False)
class _Running:
    """A request being decoded: its encoder output, and the first-pass lists of its directions."""

    request: Request
    feature: Tensor  # [1, h, w, d]
    mask: Tensor  # [1, h, w]
    lists: Dict[int, Tuple[List[List[int]], Tensor]] = field(default_factory=dict)  # direction -> (hyps, scores)


@dataclass(eq=False)
class _Member:
    """One search (a request's direction) in a slot of a running set."""

    job: _Running
    direction: int  # index into options.l2r
    start: int  # the position of its start token in the set's state
    max_len: int
    ended: bool = False  # stopped at max_len (its lists are complete)


class RunningSet:
    """The searches of one setting decoding together: InFlightSlots, resized when searches
    join that do not fit and compacted when many slots are free, and the member of each slot."""

    def __init__(self, decoder, options: SearchOptions, dtype: torch.dtype, device: torch.device, plan: DispatchPlan):
        self.decoder, self.options, self.dtype, self.device, self.plan = decoder, options, dtype, device, plan
        self.graphs = plan.graphs
        self.slots: Optional[InFlightSlots] = None
        self.members: List[Optional[_Member]] = []
        self.length = 1  # tokens per row (the state's position + 1)
        self.height = self.width = self.capacity = 0
        # A state holds at most as many positions as the positional encoding: a free slot's rows keep
        # stepping, their own positions growing up to the state's.
        self.positions_limit = decoder.pos_enc.pe.shape[0]
        self.idle_steps = 0  # steps run in a row with a free slot
        self._virgin: set = set()  # slots of a new state that no search held yet
        # admitted at this boundary, joining together at its end: one resize for all of them
        self.pending: List[_Running] = []

    # --- sizes ---------------------------------------------------------------------------

    def live(self) -> List[int]:
        return [item for item, member in enumerate(self.members) if member is not None]

    def images(self) -> int:
        """Images decoding here (their searches' slots over the directions) or joining at this boundary."""
        return -(-len(self.live()) // len(self.options.l2r)) + len(self.pending)

    def positions(self) -> int:
        """Feature positions held once the pending jobs joined: slots x the padded map."""
        return self._positions([])

    def positions_with(self, h: int, w: int) -> int:
        """Feature positions held once an image of h x w positions joins too (slots not grown)."""
        return self._positions([(h, w)])

    def _positions(self, extra: List[Tuple[int, int]]) -> int:
        sizes = [tuple(job.feature.shape[1:3]) for job in self.pending] + extra
        items = max(len(self.live()) + len(sizes) * len(self.options.l2r), len(self.members))
        return items * max([self.height] + [h for h, _ in sizes]) * max([self.width] + [w for _, w in sizes])

    def room_for(self, max_len: int) -> bool:
        """Whether a search of max_len tokens joining now fits the positional encoding (once the
        state is shifted to its earliest running search); else it waits for older ones to end."""
        shift = min((self.members[i].start for i in self.live()), default=self.length - 1)
        return self.length - 1 - shift + max_len <= self.positions_limit

    def _slot_count(self, needed: int) -> int:
        # with CUDA graphs a power of two, so that few graphs serve every size
        return 1 << (needed - 1).bit_length() if self.graphs else needed

    # --- joining and leaving -------------------------------------------------------------

    def join_pending(self) -> None:
        """Put the pending jobs' searches in free slots from the current step, resizing first
        (once for all of them) if needed."""
        jobs, self.pending = self.pending, []
        directions = len(self.options.l2r)
        h = max(job.feature.shape[1] for job in jobs)
        w = max(job.feature.shape[2] for job in jobs)
        max_len = max(job.request.options.max_len for job in jobs)
        free = [item for item, member in enumerate(self.members) if member is None]
        fits = h <= self.height and w <= self.width and self.length - 1 + max_len <= self.capacity
        if len(free) < directions * len(jobs) or not fits:
            self._rebuild(extra=(directions * len(jobs), h, w, max_len))
            free = [item for item, member in enumerate(self.members) if member is None]
        slots = iter(free)
        for job in jobs:
            for direction in range(directions):
                item = next(slots)
                self.slots.insert(item, job.feature[0], job.mask[0], self.options.l2r[direction])
                self.members[item] = _Member(job, direction, self.length - 1, job.request.options.max_len)
        self._fill_virgin_slots(jobs[0])

    def leave(self, item: int) -> None:
        self.slots.stop(item)
        self.members[item] = None

    def compact(self) -> None:
        """Free slots cost steps: when at least half are free, or some were for
        COMPACT_AFTER_STEPS steps (not with CUDA graphs, whose slots come in powers of two),
        move the live searches to a state of their own size (feature map and positions too)."""
        live = self.live()
        if not live:
            self.slots, self.members, self.length, self.height, self.width, self.capacity = None, [], 1, 0, 0, 0
        elif self._slot_count(len(live)) < len(self.members) and (
                2 * len(live) <= len(self.members) or (not self.graphs and self.idle_steps >= COMPACT_AFTER_STEPS)):
            self._rebuild()

    def _rebuild(self, extra: Optional[Tuple[int, int, int, int]] = None) -> None:
        """A new state for the live searches (and room for `extra` = (searches, h, w, max_len)
        joining now): slots, feature map and positions to fit them, shifted so that the
        earliest start is position 0."""
        live = self.live()
        old = self.slots
        shift = min((self.members[i].start for i in live), default=self.length - 1)
        heights = [self.members[i].job.feature.shape[1] for i in live]
        widths = [self.members[i].job.feature.shape[2] for i in live]
        ends = [self.members[i].start - shift + self.members[i].max_len for i in live]
        searches = len(live)
        if extra is not None:
            count, h, w, max_len = extra
            searches += count
            heights.append(h)
            widths.append(w)
            ends.append(self.length - 1 - shift + max_len)
        items = self._slot_count(searches)
        self.height, self.width = max(heights), max(widths)
        # rounded up: room for later joiners of similar lengths
        self.capacity = min(-(-max(ends) // WINDOW_STEP) * WINDOW_STEP, self.positions_limit)
        options = dataclasses.replace(self.options, max_len=self.capacity)
        layout = FeatureLayout(self.height, self.width, self.dtype, self.device, self.plan)
        self.slots = InFlightSlots(self.decoder, items, options, layout)
        members = [self.members[i] for i in live]
        if live:
            self.slots.take(old, live, shift)
            for member in members:
                member.start -= shift
            self.length -= shift
        else:
            self.length = 1
        self.members = members + [None] * (items - len(members))
        self.idle_steps = 0
        # take's fillers copy the first live search: finite caches, done
        self._virgin = set(range(items)) if not live else set()

    def _fill_virgin_slots(self, job: _Running) -> None:
        """Slots of a new state that no search ever held are given copies of `job`'s image,
        done at once: every slot then holds finite caches (a NaN there would reach a search
        inserted later through its 0-weighted PAD positions)."""
        for item in sorted(self._virgin):
            if self.members[item] is None:
                self.slots.insert(item, job.feature[0], job.mask[0], True)
                self.slots.stop(item)
        self._virgin = set()

    # --- stepping ------------------------------------------------------------------------

    def step(self) -> List[int]:
        """One beam step of every search here; returns the slots whose search reached its
        max_len with it (ended, their lists complete)."""
        self.slots.run(prefix_window(self.length, self.capacity, self.graphs))
        self.length += 1
        self.idle_steps = self.idle_steps + 1 if None in self.members else 0
        ending = [item for item, member in enumerate(self.members)
                  if member is not None and not member.ended and self.length - member.start == member.max_len]
        if ending:
            mask = torch.zeros(len(self.members), dtype=torch.bool, device=self.device)
            mask[ending] = True
            self.slots.finish(mask)
            self.slots.done |= mask
            for item in ending:
                self.members[item].ended = True
        return ending

    def done_items(self) -> List[int]:
        """Slots whose search is done (a host sync)."""
        return [item for item, (member, done) in enumerate(zip(self.members, self.slots.done.tolist()))
                if member is not None and (done or member.ended)]

    def lists(self, item: int) -> Tuple[List[List[int]], Tensor]:
        """The finished list of the search in `item`: its hypotheses (decoding order, no start
        token) and their float32 scores."""
        return self.slots.finished.results([item], [self.members[item].start])


class Scheduler:
    """Decodes submitted images with in-flight batching in a thread of its own.

    model: fastcomer's CoMER (or the public code's, see `fastcomer.model.adapt`) in eval mode,
    on any device. max_images: images decoding at once (each holds beam_size rows per
    direction); max_positions: padded feature positions held by the running states (slots x
    their padded map; default max_images x 2 x 1024, the largest map CoMER's preprocessing
    gives, i.e. no bound beyond max_images for such images); max_queue: requests waiting at
    most (`submit` raises QueueFull past it). A request larger than max_positions alone still
    runs, alone. backend, graphs, threads: as `beam_search`'s (threads: torch's intra-op
    threads of the decoding thread, default 1). on_step(rows, seconds), when given, is called
    after each step of a running set (metrics).
    """

    def __init__(self, model: torch.nn.Module, max_images: int = 8, max_positions: Optional[int] = None,
                 max_queue: int = 64, backend: BackendRequest = None, graphs: Optional[bool] = None,
                 threads: Optional[int] = None, on_step: Optional[Callable[[int, float], None]] = None):
        for name, value in (("max_images", max_images), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int)
                                          or max_positions < 1):
            raise ValueError(f"max_positions must be a positive int or None, got {max_positions!r}")
        self.model = as_comer(model)
        param = next(self.model.parameters())
        self.dtype, self.device = param.dtype, param.device
        if requested_for("beam_scorer_step", backend) not in ("auto", "torch"):
            raise ValueError("the in-flight scheduler scores each search at its own length, which only the torch beam "
                             "scorer does: leave beam_scorer_step to auto or torch (force the other ops with a mapping, "
                             "e.g. backend={'cross_attention_step': 'triton'})")
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        plan = decoding_plan(self.model.decoder, probe, backend, graphs)
        self.plan = DispatchPlan.of({**dict(plan.backends), "beam_scorer_step": "torch"}, self.dtype, plan.graphs)
        self.threads = search_threads(threads)
        self.max_images, self.max_queue = max_images, max_queue
        self.max_positions = max_positions if max_positions is not None else max_images * 2 * LARGEST_FEATURE_MAP
        self.on_step = on_step
        self._queue: Deque[Request] = collections.deque()
        self._sets: Dict[SearchOptions, RunningSet] = {}
        self._lock = threading.Condition()
        self._closing = False
        self._failure: Optional[BaseException] = None
        self._in_hand: List[Request] = []  # being encoded or rescored: in no queue or set
        self._thread = threading.Thread(target=self._loop, name="fastcomer-scheduler", daemon=True)
        self._thread.start()

    # --- the callers' side ---------------------------------------------------------------

    def submit(self, image: Tensor, beam_size: int = 10, max_len: int = 200, alpha: float = 1.0,
               early_stopping: bool = False, temperature: float = 1.0, direction: str = "both") -> Request:
        """Queue an image [1, H, W] (or [H, W]; floating point, converted to the model's dtype
        and device) for `beam_search` with these settings. Arguments are checked here
        (TypeError/ValueError, as beam_search's); QueueFull when max_queue requests wait,
        SchedulerClosed after close() or a failure."""
        if not isinstance(image, Tensor) or not image.dtype.is_floating_point:
            kind = f"a {image.dtype} tensor" if isinstance(image, Tensor) else type(image).__name__
            raise TypeError(f"image must be a floating-point torch.Tensor, got {kind}")
        if image.dim() == 2:
            image = image[None]
        if image.dim() != 3 or image.shape[0] != 1:
            raise ValueError(f"image must be [1, H, W] or [H, W], got {tuple(image.shape)}")
        img = image.to(device=self.device, dtype=self.dtype)[None]
        options = check_search_args(self.model, img, torch.zeros(img.shape[0], *img.shape[2:], dtype=torch.bool,
                                                                 device=self.device),
                                    beam_size, max_len, temperature, alpha, early_stopping, direction)
        request = Request(options, concurrent.futures.Future(), time.monotonic(), self, img)
        with self._lock:
            if self._closing or self._failure is not None:
                raise SchedulerClosed("the scheduler is closed" if self._failure is None
                                      else f"the scheduler failed: {self._failure}")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue)")
            self._queue.append(request)
            self._lock.notify()
        return request

    def queued(self) -> int:
        """Requests waiting to join."""
        return len(self._queue)

    def running(self) -> int:
        """Images decoding now."""
        return sum(s.images() for s in list(self._sets.values()))

    def close(self, timeout: Optional[float] = None) -> None:
        """Take no more requests, answer those submitted (drain), then stop the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(timeout)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # --- the decoding thread -------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with intra_op_threads(self.threads), torch.inference_mode():
                while True:
                    with self._lock:
                        while not self._queue and not self._sets and not self._closing:
                            self._lock.wait()
                        if self._closing and not self._queue and not self._sets:
                            return
                    self._boundary()
                    for running_set in list(self._sets.values()):
                        self._step(running_set)
        except BaseException as error:  # noqa: B902 - every request must hear of it
            self._fail(error)

    def _boundary(self) -> None:
        """Between steps: drop cancelled searches, compact, admit queued requests in order."""
        for running_set in self._sets.values():
            for item, member in enumerate(running_set.members):
                if member is not None and member.job.request._cancelled:
                    running_set.leave(item)
        for key in list(self._sets):
            self._sets[key].compact()
            if self._sets[key].slots is None:
                del self._sets[key]
        while True:
            with self._lock:
                if not self._queue:
                    break
                request = self._queue[0]
                if request._cancelled:
                    self._queue.popleft()
                    continue
                if not self._fits(request):
                    break  # first in, first out: the others wait behind it
                self._queue.popleft()
            self._admit(request)
        for running_set in self._sets.values():
            if running_set.pending:
                running_set.join_pending()

    def _key(self, options: SearchOptions) -> SearchOptions:
        return dataclasses.replace(options, max_len=2)  # max_len is per search: one key (the least valid) for all

    def _fits(self, request: Request) -> bool:
        if not self._sets:
            return True  # alone it always runs
        if self.running() + 1 > self.max_images:
            return False
        h, w = (-(-size // 16) for size in request._image.shape[2:])  # the encoder's feature map
        key = self._key(request.options)
        positions = sum(s.positions() for k, s in self._sets.items() if k != key)
        own = self._sets.get(key)
        if own is not None and not own.room_for(request.options.max_len):
            return False
        positions += own.positions_with(h, w) if own else len(request.options.l2r) * h * w
        return positions <= self.max_positions

    def _admit(self, request: Request) -> None:
        self._in_hand = [request]
        img = request._image
        request._image = None
        feature, mask = self.model.encoder(img, torch.zeros(1, *img.shape[2:], dtype=torch.bool, device=self.device))
        key = self._key(request.options)
        if key not in self._sets:
            self._sets[key] = RunningSet(self.model.decoder, key, self.dtype, self.device, self.plan)
        self._sets[key].pending.append(_Running(request, feature, mask))
        self._in_hand = []

    def _step(self, running_set: RunningSet) -> None:
        started = time.perf_counter()
        ended = running_set.step()
        if not self.plan.graphs or ended or (running_set.length - 1) % GRAPH_SYNC_EVERY == 0:
            for item in running_set.done_items():
                member = running_set.members[item]
                member.job.lists[member.direction] = running_set.lists(item)
                running_set.leave(item)
                if len(member.job.lists) == len(running_set.options.l2r):
                    self._answer(member.job)
        if self.on_step is not None:
            self.on_step(len(running_set.members) * running_set.options.beam_size, time.perf_counter() - started)

    def _answer(self, job: _Running) -> None:
        """Rescore a request's first-pass lists on its own and answer it, as beam_search does."""
        if job.request._cancelled:
            return
        self._in_hand = [job.request]
        options = job.request.options
        directions = len(options.l2r)
        hyps = [hyp for d in range(directions) for hyp in job.lists[d][0]]
        scores = torch.cat([job.lists[d][1] for d in range(directions)])
        if directions == 1:
            best = select_best(hyps, scores, 1, options.beam_size, options.l2r)
        else:
            reverse = rescore(self.model.decoder, job.feature, job.mask, hyps, options.beam_size, options.alpha,
                              options.temperature)
            best = select_best(hyps, scores + reverse, 1, options.beam_size)
        _resolve(job.request, best[0])
        self._in_hand = []

    def _fail(self, error: BaseException) -> None:
        """The thread failed: every request hears of it, and no more are taken."""
        with self._lock:
            self._failure = error
            pending = self._in_hand + list(self._queue)
            self._queue.clear()
        for running_set in self._sets.values():
            pending += [member.job.request for member in running_set.members if member is not None]
            pending += [job.request for job in running_set.pending]
        self._sets.clear()
        for request in pending:
            _resolve(request, SchedulerClosed(f"the scheduler failed: {error!r}"))


def _resolve(request: Request, outcome) -> None:
    """Answer a request (a Hypothesis, or an exception to raise), unless it was cancelled."""
    # Futures stay pending until answered, so that cancel() always takes; one may come between.
    try:
        if isinstance(outcome, BaseException):
            request.future.set_exception(outcome)
        else:
            request.future.set_result(outcome)
    except concurrent.futures.InvalidStateError:
        pass
