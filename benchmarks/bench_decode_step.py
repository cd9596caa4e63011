"""Per-step latency of one decoder layer's fused cross-attention + ARM step, per backend.

For each (images, L): all images x rows-per-image beams take one refining layer's step
(cross and self coverage: refinement, the returned attention, both coverage updates),
timed with CUDA events (or the wall clock on CPU). Beside each timing: the floor set by the
bytes the step must move (K/V of every image, every row's coverage sums read and written,
prev_attn read, the returned attention written) over the device's measured copy bandwidth. Writes JSON (device, date, versions, shapes, results) to --out.

    python benchmarks/bench_decode_step.py --out bench.json                      # GPU, full grid
    python benchmarks/bench_decode_step.py --device cpu --images 1 --lengths 64 \\
        --rows-per-image 2 --backends torch --out /tmp/bench.json                # CPU smoke run
"""
import argparse
import datetime
import json
import statistics
import time

import torch

from fastcomer.backends import env_report
from fastcomer.model.arm import AttentionRefinementModule
from fastcomer.ops.decode_step import fused_cross_attention_step

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_step(images, rows_per_image, length, height, nhead, head_dim, dc, dtype, device):
    g = torch.Generator().manual_seed(0)
    rows = images * rows_per_image
    arm = AttentionRefinementModule(nhead, dc, cross_coverage=True, self_coverage=True).eval()
    with torch.no_grad():
        folded = arm.fold()
    folded = folded._replace(**{name: getattr(folded, name).to(device) for name in ("conv_weight", "conv_bias", "proj_weight", "shift")})
    mask = torch.zeros(images, height, length // height, dtype=torch.bool)
    mask[1::2, :, -(length // height) // 8:] = True  # every other image: its last eighth of columns is padding
    channels = 2 * nhead
    return dict(
        q=torch.randn(rows, nhead, head_dim, generator=g).to(device, dtype),
        k=torch.randn(images, nhead, length, head_dim, generator=g).to(device, dtype),
        v=torch.randn(images, nhead, length, head_dim, generator=g).to(device, dtype),
        key_padding_mask=mask.view(images, length).to(device),
        image_index=torch.arange(images, dtype=torch.int32).repeat_interleave(rows_per_image).to(device),
        height=height,
        arm=folded,
        coverage=torch.rand(rows, channels, length, generator=g).to(device),
        prev_attn=torch.softmax(torch.randn(rows, nhead, length, generator=g), dim=-1).to(device),
    )


def bytes_moved(step) -> int:
    """What a step cannot avoid moving: K and V of every image read, every row's coverage sums
    read and written back, prev_attn read and the returned attention (as large) written."""
    size = lambda name: step[name].numel() * step[name].element_size()
    return size("k") + size("v") + 2 * size("coverage") + 2 * size("prev_attn")


def time_ms(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth(device, megabytes=256 if torch.cuda.is_available() else 32):
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def write_report(path, device, bandwidth, warmup, iters, **fields):
    """The JSON every step benchmark writes: date, device, versions, bandwidth, timing, then `fields`."""
    report = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        environment=env_report(),
        copy_bandwidth_gb_s=bandwidth / 1e9,
        timing=dict(warmup=warmup, iters=iters, statistic="median"),
        **fields,
    )
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", default="1,8,32", help="comma-separated image counts")
    parser.add_argument("--rows-per-image", type=int, default=20, help="beams per image (both directions)")
    parser.add_argument("--lengths", default="256,1024", help="comma-separated L = h * w")
    parser.add_argument("--height", type=int, default=16, help="h of the feature map (w = L / h)")
    parser.add_argument("--nhead", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--dc", type=int, default=32)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--backends", default="torch,triton,cuda")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", required=True, help="JSON output path")
    args = parser.parse_args()

    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    results = []
    for length in map(int, args.lengths.split(",")):
        height = args.height if length % args.height == 0 else 1
        for images in map(int, args.images.split(",")):
            step = make_step(images, args.rows_per_image, length, height, args.nhead, args.head_dim, args.dc,
                             DTYPES[args.dtype], device)
            floor_ms = bytes_moved(step) / bandwidth * 1e3
            for backend in args.backends.split(","):
                entry = dict(backend=backend, images=images, rows=images * args.rows_per_image, length=length,
                             height=height, width=length // height, bytes_moved=bytes_moved(step), floor_ms=floor_ms)
                try:
                    with torch.no_grad():
                        entry["ms"] = time_ms(lambda: fused_cross_attention_step(**step, backend=backend), device,
                                              args.warmup, args.iters)
                    entry["floor_fraction"] = floor_ms / entry["ms"]
                except (RuntimeError, ValueError) as err:  # a backend this machine cannot run
                    entry["error"] = str(err)
                results.append(entry)
                shown = f"{entry['ms']:.3f} ms (floor {floor_ms:.3f} ms)" if "ms" in entry else f"unavailable: {entry['error']}"
                print(f"{backend:>6}  images {images:>3}  rows {entry['rows']:>4}  L {length:>5}: {shown}", flush=True)

    write_report(args.out, device, bandwidth, args.warmup, args.iters, results=results,
                 shapes=dict(rows_per_image=args.rows_per_image, nhead=args.nhead, head_dim=args.head_dim, dc=args.dc,
                             dtype=args.dtype, coverage="cross+self, refining layer"))


if __name__ == "__main__":
    main()
