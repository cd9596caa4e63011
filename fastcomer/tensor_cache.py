"""One cache for values computed from a model's tensors (the folded ARM, the kernels' prepared
ARM weights, the engine's kept graph batches): a value is reused only while the tensors it was
computed from are the same objects, at the same addresses, not changed in place since."""
import weakref
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple, TypeVar

from torch import Tensor
from torch.utils.weak import WeakTensorKeyDictionary

Value = TypeVar("Value")


def tensors_stamp(tensors: Iterable[Tensor]) -> Tuple[Tuple[int, Optional[int]], ...]:
    """Where each tensor's data is and how often it was changed in place. Inference tensors
    keep no version counter (the engine folds under inference mode): for them only the
    address counts, and their in-place changes go unseen."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in tensors)


class DerivedCache:
    """owner -> a value computed from `tensors`. Owners (modules or tensors) and the tensors
    are held weakly, so an entry goes with its model. `compute` must not return the tensors
    themselves or views of them in a way that keeps the owner alive."""

    def __init__(self) -> None:
        self._by_module: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()
        self._by_tensor = WeakTensorKeyDictionary()

    def peek(self, owner: Any) -> Optional[Any]:
        """The value kept for owner, valid or not (None when there is none): for inspection."""
        entry = (self._by_tensor if isinstance(owner, Tensor) else self._by_module).get(owner)
        return None if entry is None else entry[2]

    def get(self, owner: Any, tensors: Sequence[Tensor], compute: Callable[[], Value]) -> Value:
        entries = self._by_tensor if isinstance(owner, Tensor) else self._by_module
        stamp = tensors_stamp(tensors)
        entry = entries.get(owner)
        if entry is not None and entry[1] == stamp and len(entry[0]) == len(tensors) \
                and all(ref() is t for ref, t in zip(entry[0], tensors)):
            return entry[2]
        value = compute()
        entries[owner] = (tuple(weakref.ref(t) for t in tensors), stamp, value)
        return value
