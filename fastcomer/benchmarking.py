"""The decoding benchmark's workload and report: the engine against CoMER's reference beam
search on the published configuration with seeded random weights (`python -m fastcomer bench`)."""
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import backends
from .flop_floor import flop_floor
from .model.comer import CoMER
from .search.engine import beam_search
from .search.images import decode_images
from .search.threads import search_threads
from .search.reference import reference_beam_search
from .vocab import EOS_IDX, SOS_IDX

FULL_SHAPES = ((128, 512), (256, 1024))
QUICK_SHAPES = ((128, 512),)


@torch.no_grad()
def scale_weights(
    model: CoMER, seed: int, end_bias: float, end_scale: float, arm_scale: float = 4.0, proj_scale: float = 2.0
) -> CoMER:
    """Make every part of a freshly initialised CoMER matter, as the golden file's weights
    do, in place; returns the model in eval mode. BatchNorm statistics are random, the ARM
    is strong enough to steer the attention, and the output projection is peaked, with end
    tokens (EOS, SOS) whose odds swing from step to step, so beams end at various lengths."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    arm = model.decoder.model.arm
    if arm is not None:
        arm.conv.weight.mul_(arm_scale)
        arm.proj.weight.mul_(arm_scale)
        bn = arm.post_norm.bn
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
    proj = model.decoder.proj
    proj.weight.mul_(proj_scale)
    proj.bias.copy_(torch.randn(proj.out_features, generator=gen))
    for end in (EOS_IDX, SOS_IDX):
        proj.weight[end] *= end_scale
        proj.bias[end] += end_bias
    return model.eval()


def bench_model(seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> CoMER:
    """The published configuration (`CoMER()` defaults) with seeded random weights."""
    torch.manual_seed(seed)
    return scale_weights(CoMER(), seed, end_bias=1.0, end_scale=4.0).to(device=device, dtype=dtype)


def bench_images(shape: Tuple[int, int], seed: int, count: int, device: str, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """`count` random images of exactly `shape`: img [count, 1, H, W], img_mask [count, H, W] (no padding)."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.rand(count, 1, *shape, generator=gen).to(device=device, dtype=dtype)
    return img, torch.zeros(count, *shape, dtype=torch.bool, device=device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn: Callable, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def run_benchmark(
    shapes: Sequence[Tuple[int, int]],
    images: int,
    beam_size: int = 10,
    max_len: int = 200,
    device: str = "cpu",
    seed: int = 0,
    log: Callable[[str], None] = print,
    batch: int = 1,
    backend: Optional[str] = None,
    graphs: Optional[bool] = None,
    workers: int = 1,
) -> Dict:
    """Decode `images` random images per shape with both searches, `batch` images per call;
    check that they answer identically; return the measurements (seconds per call). With
    workers > 1 (CPU), also the engine's time per image for all images of a shape at once,
    spread over that many worker processes (`decode_images`)."""
    if images % batch:
        raise ValueError(f"images ({images}) must be a multiple of batch ({batch})")
    model = bench_model(seed, device)
    search = dict(beam_size=beam_size, max_len=max_len)
    rows: List[Dict] = []
    for shape in shapes:
        row = {"shape": list(shape), "images": images, "batch": batch, "engine_s": [], "engine_cold_s": [], "reference_s": [],
               "identical": True, "hyp_lengths": []}
        for k in range(0, images, batch):
            img, mask = bench_images(shape, seed + k, batch, device, torch.float32)
            label = f"{shape[0]}x{shape[1]} images {k + 1}-{k + batch}/{images}"
            engine = dict(backend=backend, graphs=graphs)
            # The first search warms up (allocator, kernel compilation, graph capture: kept for later
            # searches of the same settings); its time is kept apart as the cold start.
            _, cold_s = timed(lambda: beam_search(model, img, mask, **search, **engine), device)
            row["engine_cold_s"].append(cold_s)
            fast, engine_s = timed(lambda: beam_search(model, img, mask, **search, return_details=True, **engine), device)
            log(f"{label}: engine {engine_s:.2f} s; reference running ...")
            slow, reference_s = timed(lambda: reference_beam_search(model, img, mask, **search), device)
            same = [h.seq for h in fast.hyps] == [h.seq for h in slow]
            row["engine_s"].append(engine_s)
            row["reference_s"].append(reference_s)
            row["identical"] &= same
            row["hyp_lengths"] += [len(h) for h in fast.first_pass_hyps]
            log(f"{label}: reference {reference_s:.2f} s, {reference_s / engine_s:.1f}x, answers {'identical' if same else 'DIFFER'}")
        row["engine_s_per_image"] = statistics.mean(row["engine_s"]) / batch
        row["reference_s_per_image"] = statistics.mean(row["reference_s"]) / batch
        row["ratio"] = row["reference_s_per_image"] / row["engine_s_per_image"]
        if workers > 1:
            every = [im for k in range(images) for im in bench_images(shape, seed + k, 1, device, torch.float32)[0]]
            _, spread_s = timed(lambda: decode_images(model, every, workers=workers, **search, **engine), device)
            row["engine_workers"], row["engine_spread_s_per_image"] = workers, spread_s / images
            log(f"{shape[0]}x{shape[1]}: {images} images on {workers} workers {spread_s / images:.2f} s/image")
        if device == "cpu":  # the engine against its FLOP floor on this machine (fastcomer.flop_floor)
            row["floor"] = flop_floor(model, img, mask, **search, backend=backend)
            row["floor"]["engine_ratio"] = row["engine_s_per_image"] / row["floor"]["floor_s_per_image"]
            log(f"{shape[0]}x{shape[1]}: engine {row['floor']['engine_ratio']:.2f}x its FLOP floor "
                f"({row['floor']['floor_s_per_image']:.3f} s/image, {row['floor']['flops_per_image'] / 1e9:.1f} GFLOP)")
        rows.append(row)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({cpu_name()})",
        # Other processes on the machine slow both searches, the engine's many small ops most.
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "engine_threads": search_threads(),
        "model": "CoMER() published config, seeded random weights (fastcomer.benchmarking.bench_model), float32",
        "search": {**search, "alpha": 1.0, "early_stopping": False, "temperature": 1.0, "direction": "both"},
        "engine_backend": backend or os.environ.get("FASTCOMER_BACKEND", "auto"),
        "engine_cuda_graphs": backends.use_cuda_graphs(torch.device(device), graphs),
        "results": rows,
    }


def format_table(report: Dict) -> str:
    lines = [
        f"{report['device']}, torch {report['torch']}, {report['threads']} threads, {report['date']}, "
        f"beam {report['search']['beam_size']}, max_len {report['search']['max_len']}",
        "| image | images | per call | reference s/image | engine s/image | speed-up | answers | first-pass lengths (min/median/max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        lengths = row["hyp_lengths"]
        lines.append(
            f"| {row['shape'][0]}x{row['shape'][1]} | {row['images']} | {row.get('batch', 1)} | {row['reference_s_per_image']:.3f} | "
            f"{row['engine_s_per_image']:.3f} | {row['ratio']:.1f}x | {'identical' if row['identical'] else 'DIFFER'} | "
            f"{min(lengths)}/{statistics.median(lengths):g}/{max(lengths)} |"
        )
    return "\n".join(lines)


def write_report(report: Dict, out: Optional[Path]) -> Optional[Path]:
    """Write the report as JSON: into `out` when it is an existing directory (named by the
    report's date), else to the file `out`."""
    if out is None:
        return None
    path = out / f"bench-{report['date'].replace(':', '')}.json" if out.is_dir() else out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
