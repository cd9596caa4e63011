"""`fastcomer.evaluate`: a checkpoint scored on data sets in CoMER's layout, as CoMER's test loop
scores it (docs/evaluate.md)."""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..checkpoint import load_comer, read_checkpoint
from ..model.adapt import as_comer
from ..recognize import limit_range_scale, prepare_image
from ..search.images import available_cores, decode_batches, pad_images
from ..search.options import check_search_args
from ..vocab import vocab
from . import outputs
from .batching import check_batching, plan_batches
from .data import Dataset, Sample, open_dataset, read_pixels, split_names
from .metrics import edit_distance, split_metrics

# CoMER's search settings when the checkpoint does not state them (its config.yaml's).
DEFAULT_SEARCH = {"beam_size": 10, "max_len": 200, "alpha": 1.0, "early_stopping": False, "temperature": 1.0}
CHUNK_BATCHES = 64  # batches prepared and handed to the workers at a time (bounds the images in memory)


@dataclass
class Evaluation:
    """What `evaluate` found: per split its metrics, and one record per image (caption order)."""

    metrics: Dict[str, dict]
    records: List[dict]
    settings: dict = field(default_factory=dict)


def search_settings(hyper_parameters: Optional[Mapping], overrides: Mapping) -> dict:
    """CoMER's defaults, then the checkpoint's stored ones (as LitCoMER's test loop passes its
    hparams to the search), then the overrides that are not None."""
    settings = dict(DEFAULT_SEARCH)
    for key in settings:
        if hyper_parameters is not None and key in hyper_parameters:
            settings[key] = hyper_parameters[key]
        if overrides.get(key) is not None:
            settings[key] = overrides[key]
    return settings


def _model_and_hparams(model, device) -> Tuple[nn.Module, Optional[Mapping]]:
    if isinstance(model, nn.Module):
        hparams = getattr(model, "hparams", None)  # LitCoMER's
        return as_comer(model), hparams if isinstance(hparams, Mapping) else None
    raw = read_checkpoint(model, map_location=device)
    hparams = raw.get("hyper_parameters") if isinstance(raw, Mapping) else None
    return load_comer(raw, map_location=device), hparams if isinstance(hparams, Mapping) else None


def _load_split(dataset: Dataset, samples: List[Sample]):
    """The samples, their PIL images (None where the image failed), and each failure by index."""
    images, errors = [], {}
    for i, sample in enumerate(samples):
        image = None
        if sample.image is None:
            errors[i] = f"missing image: no img/{sample.name}.bmp nor {sample.name}.* in the split's folder"
        else:
            try:
                image = read_pixels(dataset.read(sample))
                limit_range_scale(image.size[1], image.size[0])  # an aspect ratio CoMER cannot scale
            except (OSError, ValueError, SyntaxError, EOFError) as err:
                errors[i], image = f"unreadable image: {err or type(err).__name__}", None
        images.append(image)
    return samples, images, errors


def _check_request(model: nn.Module, settings: dict, batching: str, limit) -> None:
    """Settings the search and the batching refuse, refused before anything is read or written."""
    check_batching(batching)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    param = next(model.parameters())
    img = torch.zeros(1, 1, 16, 16, dtype=param.dtype, device=param.device)  # an image the checks accept
    check_search_args(model, img, torch.zeros(1, 16, 16, dtype=torch.bool, device=param.device), settings["beam_size"],
                      settings["max_len"], settings["temperature"], settings["alpha"], settings["early_stopping"])


def _record(sample: Sample, latex=None, distance=None, score=None, error=None) -> dict:
    if error is None and sample.unknown:
        error = f"unknown tokens: {' '.join(sample.unknown)}"  # decoded, not scored
    return {"name": sample.name, "split": sample.split, "latex": latex, "truth": " ".join(sample.tokens),
            "distance": distance, "score": score, "error": error}


def _world() -> Tuple[int, int]:
    """(this process's rank, the number of processes): torch.distributed's group when initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _on_rank_zero(action: Callable[[], Tuple[Optional[Path], dict]]) -> Tuple[Optional[Path], dict]:
    """action() in process 0 only (the one that writes the files); the others get its records, no
    folder, and its exception if it raised one."""
    rank, world = _world()
    if world == 1:
        return action()
    outcome: List = [None]
    if rank == 0:
        try:
            outcome[0] = action()
        except Exception as err:  # noqa: BLE001 - raised again in every process
            outcome[0] = err
    torch.distributed.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return (outcome[0][0] if rank == 0 else None), outcome[0][1]


def _decoded(model, work, loaded, workers, search: dict) -> Iterator[List[dict]]:
    """Each batch's records, in the order of `work`, as batches finish. Under torch.distributed
    each process decodes every world-th batch of a chunk and the chunk's records are gathered by all."""
    rank, world = _world()
    param = next(model.parameters())
    if workers is None and world > 1:
        workers = max(1, available_cores() // world)  # the processes of one machine share its cores
    step = CHUNK_BATCHES * world
    for start in range(0, len(work), step):
        chunk = work[start : start + step]
        mine = chunk[rank::world]
        padded = [pad_images([prepare_image(loaded[name][1][i], invert=False).to(param.device, param.dtype)
                              for i in batch]) for name, batch in mine]
        answers = decode_batches(model, padded, workers, **search)
        decoded = ([_answer(loaded[name][0][i], hyp) for i, hyp in zip(batch, hyps)]
                   for (name, batch), hyps in zip(mine, answers))
        if world == 1:
            yield from decoded
            continue
        shards: List[List[List[dict]]] = [None] * world  # type: ignore[list-item]
        torch.distributed.all_gather_object(shards, list(decoded))
        for j in range(len(chunk)):
            yield shards[j % world][j // world]


def _answer(sample: Sample, hyp) -> dict:
    tokens = vocab.indices2words(hyp.seq)
    return _record(sample, " ".join(tokens), edit_distance(tokens, sample.tokens), hyp.score)


def evaluate(
    model: Union[nn.Module, str, os.PathLike],
    data: Union[str, os.PathLike],
    split: Union[None, str, Sequence[str]] = None,
    out: Union[None, str, os.PathLike] = None,
    *,
    batching: str = "comer",
    beam_size: Optional[int] = None,
    max_len: Optional[int] = None,
    alpha: Optional[float] = None,
    early_stopping: Optional[bool] = None,
    temperature: Optional[float] = None,
    device: Optional[str] = None,
    workers: Optional[int] = None,
    resume: bool = False,
    limit: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    **engine_kwargs,
) -> Evaluation:
    """Score a CoMER model on data in CoMER's layout (docs/evaluate.md), as CoMER's test loop does.

    model: a CoMER module (fastcomer's, or the public code's CoMER / LitCoMER) or a checkpoint
    path (loaded by `load_comer` onto `device`; its stored search settings are used). data:
    CoMER's data.zip, the same extracted, or one split's folder. split: a name or names
    (default: every split but 'train'). batching "comer": CoMER's test batches (so its
    answers); "alone": each image on its own. Search settings: beam_size ... temperature,
    None = the checkpoint's, else CoMER's (beam 10, max_len 200, alpha 1.0); engine_kwargs go
    to `beam_search` (backend, graphs, threads). workers: CPU processes (`decode_batches`).
    Under torch.distributed (torchrun) every process decodes a share of the batches and process 0
    writes the files; each returns the whole evaluation, the same as one process's.
    limit: the first N captions of each split. progress(done, total): after each batch.

    out: a folder for predictions.jsonl (appended as batches finish), metrics.json, run.json and
    result.zip (one split; several: <split>/result.zip each). An existing run there raises
    FileExistsError unless resume=True, which skips the images already decoded (same settings
    required) and gives the same final files. Caption files are all parsed before any decoding
    (a bad one raises `CaptionError`); a missing or unreadable image, an unknown caption token,
    an image CoMER leaves out: recorded with its error and counted, not scored.
    """
    model, hparams = _model_and_hparams(model, device)
    settings = search_settings(hparams, {"beam_size": beam_size, "max_len": max_len, "alpha": alpha,
                                         "early_stopping": early_stopping, "temperature": temperature})
    _check_request(model, settings, batching, limit)
    dataset = open_dataset(data)
    try:
        splits = split_names([split] if isinstance(split, str) else split, dataset)
        captions = {name: dataset.samples(name)[:limit] for name in splits}  # every one parses, before any decoding
        plan = {"data": os.path.abspath(os.fspath(data)), "splits": list(splits), "batching": batching,
                "limit": limit, "search": settings}
        folder, done = _on_rank_zero(lambda: _open_output(out, plan, resume))
        loaded = {name: _load_split(dataset, samples) for name, samples in captions.items()}
    finally:
        dataset.close()
    records: Dict[Tuple[str, str], dict] = {}
    batches_per_split = {}
    for name, (samples, images, errors) in loaded.items():
        areas = [im.size[0] * im.size[1] if im is not None else 0 for im in images]
        usable = [i for i in range(len(samples)) if i not in errors]
        batches, left_out = plan_batches([areas[i] for i in usable], [len(samples[i].tokens) for i in usable], batching)
        batches_per_split[name] = [[usable[j] for j in batch] for batch in batches]
        for j, why in left_out.items():
            errors[usable[j]] = f"left out: {why}"
        for i, error in errors.items():
            records[(name, samples[i].name)] = _record(samples[i], error=error)
    work = []  # (split, batch) still to decode; the others' records come from the interrupted run
    for name, batches in batches_per_split.items():
        for batch in batches:
            keys = [(name, loaded[name][0][i].name) for i in batch]
            if all(key in done for key in keys):
                records.update((key, done[key]) for key in keys)
            else:
                work.append((name, batch))
    total = sum(len(batch) for batches in batches_per_split.values() for batch in batches)
    finished = total - sum(len(batch) for _, batch in work)
    log = open(folder / outputs.PREDICTIONS, "a") if folder is not None else None
    try:
        for batch_records in _decoded(model, work, loaded, workers, {**settings, **engine_kwargs}):
            records.update(((r["split"], r["name"]), r) for r in batch_records)
            if log is not None:
                log.write("".join(map(outputs.record_line, batch_records)))  # a batch at a time: a resume redoes whole batches
                log.flush()
            finished += len(batch_records)
            if progress is not None:
                progress(finished, total)
    finally:
        if log is not None:
            log.close()
    ordered = [records[(name, s.name)] for name, (samples, _, _) in loaded.items() for s in samples]
    metrics = {name: split_metrics([r for r in ordered if r["split"] == name]) for name in splits}
    if folder is not None:
        _write_outputs(folder, splits, ordered, metrics, batches_per_split, loaded, records, plan)
    return Evaluation(metrics, ordered, settings)


def _open_output(out, plan: dict, resume: bool):
    """(the output folder or None, the records already decoded there)."""
    if out is None:
        if resume:
            raise ValueError("resume needs the output folder of the interrupted run (out=...)")
        return None, {}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    run_file, log = folder / outputs.RUN, folder / outputs.PREDICTIONS
    if not resume:
        if log.exists() or run_file.exists():
            raise FileExistsError(f"{folder} holds an evaluation already: resume it (--resume) or choose another folder")
    elif run_file.exists():
        import json

        stored = json.loads(run_file.read_text())
        if stored != plan:
            changed = sorted(k for k in set(plan) | set(stored) if plan.get(k) != stored.get(k))
            raise ValueError(f"cannot resume {folder}: the run there had other settings ({', '.join(changed)})")
    outputs.write_atomically(run_file, outputs.json_bytes(plan))
    return folder, outputs.read_log(log)


def _write_outputs(folder: Path, splits, ordered, metrics, batches_per_split, loaded, records, plan) -> None:
    for name in splits:
        target = folder / outputs.RESULT_ZIP if len(splits) == 1 else folder / name / outputs.RESULT_ZIP
        target.parent.mkdir(exist_ok=True)
        samples = loaded[name][0]
        decoded = [records[(name, samples[i].name)] for batch in batches_per_split[name] for i in batch]
        outputs.result_zip(target, [(r["name"], r["latex"]) for r in decoded])
    outputs.write_atomically(folder / outputs.METRICS, outputs.json_bytes({"run": plan, "splits": metrics}))
    outputs.write_atomically(folder / outputs.PREDICTIONS, "".join(map(outputs.record_line, ordered)).encode())
