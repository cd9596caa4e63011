"""One cache for values computed from tensors (the kernels' prepared ARM weights, the engine's
kept slots): a value is reused only while the tensors it was computed from are the same
objects, at the same addresses, not changed in place since as far as their version counters
tell.

Version counters miss some in-place changes (through `.data`, or of inference tensors, which
keep none), so the engine does not rely on them: it folds the ARM afresh for every search and
`refresh`es the values derived from it in place (see search/decoding_state.py)."""
import threading
import weakref
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple, TypeVar

from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

Value = TypeVar("Value")


def tensors_stamp(tensors: Iterable[Tensor]) -> Tuple[Tuple[int, Optional[int]], ...]:
    """Where each tensor's data is and how often it was changed in place (None for inference
    tensors, which keep no version counter)."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in tensors)


class DerivedCache:
    """owner -> a value computed from `tensors`. Owners (modules or tensors) and the tensors
    are held weakly, so an entry goes with its model. `compute` must not return the tensors
    themselves or views of them in a way that keeps the owner alive. Safe to use from several
    threads (two threads may both compute a missing value; one of them is kept)."""

    def __init__(self) -> None:
        self._by_module: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()
        self._by_tensor = WeakTensorKeyDictionary()
        self._lock = threading.Lock()

    def _entries(self, owner: Any):
        return self._by_tensor if isinstance(owner, Tensor) else self._by_module

    def peek(self, owner: Any) -> Optional[Any]:
        """The value kept for owner, valid or not (None when there is none): for inspection."""
        with self._lock:
            entry = self._entries(owner).get(owner)
        return None if entry is None else entry[2]

    def get(self, owner: Any, tensors: Sequence[Tensor], compute: Callable[[], Value]) -> Value:
        """The value kept for owner if it was computed from these tensors, else compute()'s (kept)."""
        stamp = tensors_stamp(tensors)
        with self._lock:
            entry = self._entries(owner).get(owner)
        if entry is not None and entry[1] == stamp and len(entry[0]) == len(tensors) \
                and all(ref() is t for ref, t in zip(entry[0], tensors)):
            return entry[2]
        value = compute()
        self._store(owner, tensors, value)
        return value

    def refresh(self, owner: Any, tensors: Sequence[Tensor], compute: Callable[[], Sequence[Tensor]]) -> None:
        """Recompute the value kept for owner (a tuple of tensors) and write it into the kept
        tensors in place, so that their addresses stay (CUDA graphs captured with them read
        the new values); nothing when no value is kept."""
        with self._lock:
            entry = self._entries(owner).get(owner)
        if entry is None:
            return
        kept, fresh = entry[2], compute()
        if len(kept) != len(fresh) or any(k.shape != f.shape for k, f in zip(kept, fresh)):
            self._store(owner, tensors, fresh)
            return
        for k, f in zip(kept, fresh):
            k.copy_(f)
        self._store(owner, tensors, kept)

    def _store(self, owner: Any, tensors: Sequence[Tensor], value: Any) -> None:
        with self._lock:
            self._entries(owner)[owner] = (tuple(weakref.ref(t) for t in tensors), tensors_stamp(tensors), value)
