"""The engine's CPU threading policy: how many intra-op threads torch uses during a search.

A decoding step is hundreds of small ops (a few microseconds to a millisecond each). With
several intra-op threads every op opens a parallel region whose cost is a handful of
thread wake-ups, not FLOPs; when another process holds a core, each region waits for a
descheduled thread, and a search runs several times slower (docs/cpu.md, 'Threads').
So a search runs with DEFAULT_SEARCH_THREADS = 1 intra-op thread by default; images are
spread over the cores instead (`decode_images(..., workers=...)`).

torch's intra-op thread count (OpenMP and MKL) is per OS thread, so setting it here for the
duration of a search leaves other Python threads' settings alone.
"""
import functools
import inspect
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, TypeVar

import torch

THREADS_ENV = "FASTCOMER_THREADS"
DEFAULT_SEARCH_THREADS = 1

F = TypeVar("F", bound=Callable)


def search_threads(threads: Optional[int] = None) -> int:
    """The intra-op thread count of a search: threads when given, else $FASTCOMER_THREADS,
    else DEFAULT_SEARCH_THREADS."""
    if threads is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        if not text:
            return DEFAULT_SEARCH_THREADS
        try:
            threads = int(text)
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {text!r}") from None
        if threads < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {text!r}")
        return threads
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"threads must be an int or None, got {type(threads).__name__}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return threads


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch.set_num_threads(threads) in this thread for the block; the previous count is
    restored afterwards, also when the block raises."""
    previous = torch.get_num_threads()
    if previous == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def with_search_threads(search: F) -> F:
    """Run `search` under `intra_op_threads(search_threads(threads))`, threads being its
    own `threads` argument."""
    signature = inspect.signature(search)

    @functools.wraps(search)
    def wrapper(*args, **kwargs):
        threads = signature.bind(*args, **kwargs).arguments.get("threads")
        with intra_op_threads(search_threads(threads)):
            return search(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
