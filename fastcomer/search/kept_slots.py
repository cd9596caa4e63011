"""The engine's static buffers kept across searches: with CUDA graphs, a search's slots and
their captured graphs serve later searches of the same settings (`slots_lease`).

A search checks kept slots out while it runs and back in when it ends, so no two searches
ever share them: a search running beside another builds its own. Kept slots hold nothing
computed from the model's weights that is not refreshed in place at the start of each search
(the folded ARM and the kernels' prepared weights, see DecodingState.refresh_arm); the graphs
read every other weight by address, so the kept slots are let go of when a decoder tensor
moves or is replaced."""
import collections
import contextlib
import threading
import weakref
from typing import Callable, Iterator

from ..tensor_cache import DerivedCache
from .options import SearchOptions
from .search_slots import FeatureLayout, SearchSlots

# Slot sets (their buffers and graphs) kept per decoder for later searches of the same shapes.
KEPT_SLOTS = 8

_kept = DerivedCache()
_checkout = threading.Lock()  # guards every decoder's kept OrderedDict


def kept_slots(decoder) -> "collections.OrderedDict[tuple, SearchSlots]":
    """The slot sets kept for `decoder` and not in use, newest last (empty when none)."""
    return _kept.peek(decoder) or collections.OrderedDict()


@contextlib.contextmanager
def slots_lease(decoder, options: SearchOptions, features: FeatureLayout) -> Iterator[Callable[[int], SearchSlots]]:
    """`with slots_lease(...) as make_slots`: make_slots(items) gives SearchSlots of that many
    item slots for one search. With graphs (features.plan.graphs), slot sets (and their captured graphs) kept from
    an earlier search of the same settings are checked out for this search alone, and with
    those it built are checked back in when it ends (not when it fails: their state is then
    unknown), for later searches, as long as the decoder's tensors stay where they are."""
    if not features.plan.graphs:
        yield lambda items: SearchSlots(decoder, items, options, features)
        return
    kept = _kept.get(decoder, (*decoder.parameters(), *decoder.buffers()), collections.OrderedDict)
    used = {}

    def make_slots(items: int) -> SearchSlots:
        key = (items, options, features)
        with _checkout:
            slots = kept.pop(key, None)
        if slots is None:
            # a weak proxy: the cache, keyed weakly on the decoder, must not keep it alive
            slots = SearchSlots(weakref.proxy(decoder), items, options, features)
        used[key] = slots
        return slots

    yield make_slots
    with _checkout:
        for key, slots in used.items():
            kept[key] = slots
            kept.move_to_end(key)
        while len(kept) > KEPT_SLOTS:
            kept.popitem(last=False)
