"""The engine's static buffers kept across searches: with CUDA graphs, a search's slots and
their captured graphs serve later searches of the same settings (`slots_factory`)."""
import collections
import weakref
from typing import Callable

from ..tensor_cache import DerivedCache
from .options import SearchOptions
from .search_slots import FeatureLayout, SearchSlots

# Slot sets (their buffers and graphs) kept per decoder for later searches of the same shapes.
KEPT_SLOTS = 8

_kept = DerivedCache()


def kept_slots(decoder) -> "collections.OrderedDict[tuple, SearchSlots]":
    """The slot sets kept for `decoder`, newest last (empty when none)."""
    return _kept.peek(decoder) or collections.OrderedDict()


def slots_factory(decoder, options: SearchOptions, features: FeatureLayout,
                  graphs: bool) -> Callable[[int], SearchSlots]:
    """SearchSlots by number of item slots, for one search. With graphs, slots (and their captured
    graphs) are kept for later searches of the same settings, as long as the decoder's
    tensors stay where they are, unchanged: a graph reads its tensors by address, and the
    folded ARM and prepared kernel weights it holds were computed from their values."""
    if not graphs:
        return lambda items: SearchSlots(decoder, items, options, features, graphs=False)
    kept = _kept.get(decoder, (*decoder.parameters(), *decoder.buffers()), collections.OrderedDict)

    def get(items: int) -> SearchSlots:
        key = (items, options, features)
        if key not in kept:
            # a weak proxy: the cache, keyed weakly on the decoder, must not keep it alive
            kept[key] = SearchSlots(weakref.proxy(decoder), items, options, features, graphs=True)
            while len(kept) > KEPT_SLOTS:
                kept.popitem(last=False)
        kept.move_to_end(key)
        return kept[key]
    return get
