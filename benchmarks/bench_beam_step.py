"""Latency of one whole beam-search step (embedding, every decoder layer with the fused
cross-attention + ARM step, logits, log-softmax, top-k, finished lists, reorder), as CUDA
graph replays and as eager launches, on the published CoMER configuration.

For each (images, L): a SearchSlots of `images` images x 20 rows (beam 10, both directions)
is started on random images whose feature map is 16 x L/16, then timed over steps whose
prefix window is 64 positions (the steps of a mid-length expression). Beside each timing:
the floor set by the bytes a step must move (decoder weights, every image's K/V per layer,
every row's coverage sums read and written, the self-attention cache's window) over the
device's measured copy bandwidth. Writes JSON (device, date, versions, shapes, results).

    python benchmarks/bench_beam_step.py --out step.json                          # GPU
    python benchmarks/bench_beam_step.py --device cpu --images 1 --lengths 256 \\
        --modes eager --out /tmp/step.json                                         # CPU smoke run
"""
import argparse

import torch

from bench_decode_step import copy_bandwidth, time_ms, write_report
from fastcomer.benchmarking import bench_model
from fastcomer import backends
from fastcomer.search.options import SearchOptions
from fastcomer.search.search_slots import FeatureLayout, SearchSlots

WINDOW = 64
HEIGHT = 16  # feature rows: a 256-pixel-high image


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def floor_bytes(batch: SearchSlots) -> int:
    state = batch.state
    weights = sum(tensor_bytes(p) for p in state.decoder.parameters())
    coverage = 2 * tensor_bytes(state.coverage) if state.coverage is not None else 0
    self_kv = (tensor_bytes(state.self_keys) + tensor_bytes(state.self_values)) * WINDOW // state.max_len
    return weights + tensor_bytes(state.memory_kv) + coverage + self_kv


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", default="1,8,32", help="comma-separated image counts")
    parser.add_argument("--lengths", default="256,1024", help="comma-separated L = h * w (h = 16)")
    parser.add_argument("--modes", default="graphs,eager", help="graphs and/or eager")
    parser.add_argument("--backend", default=None, help="cross-attention step backend (default: auto)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--out", required=True, help="JSON output path")
    args = parser.parse_args()
    if args.warmup + args.iters + 1 >= WINDOW:
        raise SystemExit(f"--warmup + --iters must stay below {WINDOW - 1}: the timed steps share one window")

    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    model = bench_model(0, str(device))
    beam_size, max_len = 10, 200
    results = []
    for length in map(int, args.lengths.split(",")):
        width = length // HEIGHT
        for images in map(int, args.images.split(",")):
            img = torch.rand(images, 1, HEIGHT * 16, width * 16, device=device)
            feature, mask = model.encoder(img, torch.zeros(images, HEIGHT * 16, width * 16, dtype=torch.bool, device=device))
            for mode in args.modes.split(","):
                layout = FeatureLayout(HEIGHT, width, feature.dtype, device, backends.resolve(feature, args.backend))
                batch = SearchSlots(model.decoder, 2 * images, SearchOptions(beam_size, max_len), layout,
                                    graphs=mode == "graphs")
                batch.start(feature, mask)
                floor_ms = floor_bytes(batch) / bandwidth * 1e3
                ms = time_ms(lambda: batch.run(WINDOW), device, args.warmup, args.iters)
                entry = dict(mode=mode, kernel=batch.state.backend, images=images, rows=batch.state.rows, length=length,
                             height=HEIGHT, width=width, ms=ms, floor_bytes=floor_bytes(batch), floor_ms=floor_ms,
                             floor_fraction=floor_ms / ms)
                results.append(entry)
                print(f"{mode:>6} ({entry['kernel']})  images {images:>3}  rows {entry['rows']:>4}  L {length:>5}: "
                      f"{ms * 1e3:8.1f} us per step (floor {floor_ms * 1e3:.1f} us)", flush=True)

    write_report(args.out, device, bandwidth, args.warmup, args.iters, results=results,
                 model="CoMER() published config (d 256, 8 heads, 3 layers, dc 32), seeded random weights, float32",
                 shapes=dict(beam_size=beam_size, directions=2, max_len=max_len, window=WINDOW, feature_height=HEIGHT))


if __name__ == "__main__":
    main()
