"""The first pass of the engine's beam search: every search of a batch of images, on
`SearchSlots`, until each is done or max_len.

The host reads the done flags every `sync_every` steps (every step without graphs): it stops
when every search is done, and when enough searches are done it moves the live ones to a set
of fewer slots (a power of two of them with graphs, so that few graphs serve every size).
Done searches' rows stay until then, frozen out of the finished lists (the cross-attention
step skips them).
"""
from typing import List, Tuple

from torch import Tensor

from ..ops.beam_scorer_step import FinishedLists
from ..ops.dispatch import DispatchPlan
from .decoding_state import prefix_window
from .kept_slots import slots_lease
from .options import SearchOptions
from .search_slots import FeatureLayout

# With CUDA graphs the host looks at the done flags every this many steps: a sync drains the
# GPU's queue, so it is rare; the cost is up to this many steps run after the last search ends.
GRAPH_SYNC_EVERY = 8


def first_pass(decoder, feature: Tensor, mask: Tensor, options: SearchOptions,
               plan: DispatchPlan) -> Tuple[List[List[int]], Tensor]:
    """The beam searches of every image in the given directions, run as `plan` says
    (`fastcomer.ops.dispatch.decoding_plan`). Returns the finished lists, item after item (all
    images' first direction, then the second), hypotheses without their start token, and
    their float32 scores, as `reference._first_pass`."""
    batch, h, w, _ = feature.shape
    graphs = plan.graphs
    features = FeatureLayout(h, w, feature.dtype, feature.device, plan)
    max_len, directions = options.max_len, len(options.l2r)
    slots = (lambda n: 1 << (n - 1).bit_length()) if graphs else (lambda n: n)
    sync_every = GRAPH_SYNC_EVERY if graphs else 1

    with slots_lease(decoder, options, features) as make_batch:
        results = FinishedLists(batch * directions, options.beam_size, max_len, options.alpha, options.early_stopping,
                                feature.device)
        current = make_batch(slots(batch * directions))
        current.start(feature, mask)
        length = 1  # tokens per row
        while length < max_len:
            current.run(prefix_window(length, max_len, graphs))
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
