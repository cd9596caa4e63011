"""Decoding many images of different sizes: batches of similar sizes, to cut padding, spread
over worker processes on CPU."""
import dataclasses
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..allocator import keep_freed_memory, release_freed_memory
from ..model.adapt import as_comer
from .engine import beam_search
from .engine_options import EngineOptions
from .hypotheses import Hypothesis
from .options import SearchOptions

ENGINE_KNOBS = ("backend", "graphs", "threads")  # beam_search's arguments that go to EngineOptions


def pad_images(images: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """[1, H, W] images -> img [b, 1, Hmax, Wmax] (zeros outside each image), img_mask [b, Hmax, Wmax] (True = padding)."""
    height, width = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    img = images[0].new_zeros(len(images), 1, height, width)
    mask = torch.ones(len(images), height, width, dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        img[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return img, mask


def size_buckets(sizes: Sequence[Tuple[int, int]], batch_size: int) -> List[List[int]]:
    """Indices of images grouped in batches of up to batch_size, images of one size together
    and neighbouring sizes next to each other (sorted by height, then width)."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# The model of a worker process of decode_images, inherited by fork (never pickled).
_worker_model = None


def _start_worker(model) -> None:
    global _worker_model
    _worker_model = model
    keep_freed_memory()  # the worker is fastcomer's own process


def _decode_batch(img: Tensor, mask: Tensor, search_kwargs: dict) -> List[Hypothesis]:
    return beam_search(_worker_model, img, mask, **search_kwargs)


def check_decode_args(model, search_kwargs: dict) -> None:
    """The checks of decode_images' search arguments, before any image is read or worker forked:
    every option (`SearchOptions`, with the model's limits; `EngineOptions`), a TypeError for
    an unknown one."""
    search_kwargs = dict(search_kwargs)
    if search_kwargs.pop("return_details", False):
        raise ValueError("decode_images returns answers only; call beam_search for return_details")
    engine = {key: search_kwargs.pop(key) for key in ENGINE_KNOBS if key in search_kwargs}
    unknown = sorted(set(search_kwargs) - {field.name for field in dataclasses.fields(SearchOptions)})
    if unknown:
        raise TypeError(f"unknown search arguments {unknown}: see fastcomer.beam_search")
    SearchOptions(**search_kwargs).check_model(model)
    EngineOptions(next(model.parameters()).device, **engine)


def decode_batches(model: torch.nn.Module, batches: Sequence[Tuple[Tensor, Tensor]], workers: Optional[int] = None,
                   **search_kwargs) -> Iterator[List[Hypothesis]]:
    """`beam_search(model, img, mask, **search_kwargs)` of each padded batch (img, mask) on the
    model's device, yielded in order as they finish; on CPU spread over `workers` forked
    processes as `decode_images` describes (the pool lives while the generator runs)."""
    model = as_comer(model)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    processes = min(workers or available_cores(), len(batches))
    if next(model.parameters()).device.type != "cpu" or "fork" not in multiprocessing.get_all_start_methods():
        processes = 1
    elif processes > 1 and multiprocessing.current_process().daemon:
        # A daemonic process (a multiprocessing.Pool or DataLoader worker) may not have children.
        warnings.warn("decoding runs in a daemonic process, which cannot start workers: decoding in this "
                      "process (pass workers=1 to silence this)", RuntimeWarning, stacklevel=3)
        processes = 1
    if processes <= 1:
        for img, mask in batches:
            yield beam_search(model, img, mask, **search_kwargs)
        return
    release_freed_memory()  # not inherited by the forked workers
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                             initializer=_start_worker, initargs=(model,)) as pool:
        yield from pool.map(_decode_batch, *zip(*batches), [search_kwargs] * len(batches))


def decode_images(model: torch.nn.Module, images: Sequence[Tensor], batch_size: Optional[int] = None, workers: Optional[int] = None,
                  **search_kwargs) -> List[Hypothesis]:
    """Beam search (`fastcomer.beam_search`, with search_kwargs) over images [1, H, W] or
    [H, W] of any sizes, on the model's device; answers in input order.

    Each answer is CoMER's for the padded batch its image lands in; images of one size are
    batched together, so when every batch holds a single size (or batch_size is 1) the
    answers equal those of decoding each image alone. batch_size None: 1 on CPU (a search
    of one image per core is the fastest there), 16 on CUDA.

    workers (CPU models): batches are decoded by this many worker processes at once, each
    search single-threaded (`beam_search`'s threads), so N images on N cores take about
    the time of one; None: the cores this process may use (`available_cores`), at most one
    per batch. The workers are forked, so the model is shared, not pickled; where fork is
    unavailable, or for a CUDA model, batches run one after another in this process; so do
    they, with a RuntimeWarning, inside a daemonic process (a multiprocessing.Pool or
    DataLoader worker, which may not start processes): the same answers. The workers keep
    freed memory for reuse (`fastcomer.allocator`; FASTCOMER_MALLOC=system: not).

    Floating-point images are converted to the model's dtype; other types raise TypeError
    (integer pixels are not rescaled for you). Every argument and every image is checked
    before any search or worker starts (`check_decode_args`); no images give [].
    """
    model = as_comer(model)  # fastcomer's CoMER, the public code's CoMER or LitCoMER
    param = next(model.parameters())
    if batch_size is None:
        batch_size = 1 if param.device.type == "cpu" else 16
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__} {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_decode_args(model, search_kwargs)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    prepared = []
    for i, im in enumerate(images):
        if not isinstance(im, Tensor) or not im.dtype.is_floating_point:
            kind = f"a {im.dtype} tensor" if isinstance(im, Tensor) else type(im).__name__
            raise TypeError(f"image {i}: expected a floating-point torch.Tensor, got {kind}")
        if im.dim() not in (2, 3) or (im.dim() == 3 and im.shape[0] != 1) or im.numel() == 0:
            raise ValueError(f"image {i}: expected a non-empty [1, H, W] or [H, W] tensor, got {tuple(im.shape)}")
        if not bool(torch.isfinite(im).all()):
            raise ValueError(f"image {i} holds NaN or infinite pixels")
        prepared.append((im if im.dim() == 3 else im[None]).to(device=param.device, dtype=param.dtype))
    if not prepared:
        return []
    buckets = size_buckets([tuple(im.shape[1:]) for im in prepared], batch_size)
    batches = [pad_images([prepared[i] for i in bucket]) for bucket in buckets]
    answers: List[Hypothesis] = [None] * len(prepared)  # type: ignore[list-item]
    for bucket, hyps in zip(buckets, decode_batches(model, batches, workers, **search_kwargs)):
        for i, hyp in zip(bucket, hyps):
            answers[i] = hyp
    return answers
