"""`fastcomer bench`: the decoding engine against the reference beam search."""
import argparse
import os

from ..shapes import BEAM_SIZE, IMAGE_SHAPES, MAX_LEN, QUICK_IMAGE_SHAPES, QUICK_MAX_LEN
from .arguments import check_model_limits, device, image_shape, max_len, output_path, positive_int

SHAPES = " and ".join(f"{h}x{w}" for h, w in IMAGE_SHAPES)
QUICK = " and ".join(f"{h}x{w}" for h, w in QUICK_IMAGE_SHAPES)


def add_parser(commands) -> None:
    timing = commands.add_parser(
        "bench",
        help="time the decoding engine against the reference beam search (published config, random weights)",
        description="Decode random images with the published CoMER configuration (seeded random weights scaled so "
        "that beams end at various lengths), one image per call, with the engine and with the reference beam "
        "search; check that they answer identically; print the time per image of each and the ratio. Default: "
        f"one image of each of {SHAPES} (--images for more), beam {BEAM_SIZE}, max_len {MAX_LEN}; on 2 CPU cores the "
        f"reference needs minutes per image. --quick: {QUICK} only, max_len {QUICK_MAX_LEN} (under a minute on 2 idle CPU "
        "cores; the ratio grows with the decoded length, so it understates the full run's).",
    )
    timing.add_argument("--quick", action="store_true", help=f"{QUICK} only, max_len {QUICK_MAX_LEN}")
    timing.add_argument("--shape", type=image_shape, action="append", help=f"HEIGHTxWIDTH, repeatable (default: {SHAPES})")
    timing.add_argument("--images", type=positive_int, default=1, help="images per shape (default: %(default)s)")
    timing.add_argument("--batch", type=positive_int, default=1, help="images per call, --images is a multiple of it (default: %(default)s)")
    timing.add_argument("--backend", choices=["auto", "cuda", "triton", "torch"], help="the engine's cross-attention step (default: $FASTCOMER_BACKEND, else auto)")
    timing.add_argument("--graphs", choices=["auto", "on", "off"], default="auto",
                        help="replay the engine's steps as CUDA graphs (default: $FASTCOMER_CUDA_GRAPHS, else on for CUDA)")
    timing.add_argument("--max-len", type=max_len, help=f"default: {MAX_LEN}, or {QUICK_MAX_LEN} with --quick")
    timing.add_argument("--beam-size", type=positive_int, default=BEAM_SIZE)
    timing.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:n] (default: %(default)s)")
    timing.add_argument("--seed", type=int, default=0)
    timing.add_argument("--threads", type=positive_int, help="torch CPU threads of both searches (default: the "
                        "engine's $FASTCOMER_THREADS, else 1; the reference's torch's choice)")
    timing.add_argument("--workers", type=positive_int, default=1, help="also time all images of a shape spread over "
                        "this many worker processes (CPU; default: %(default)s)")
    timing.add_argument("--out", type=output_path,
                        help="write the results as JSON (fastcomer.benchmarking's schema) to this file, or into this directory")
    timing.set_defaults(run=run, parser=timing)


def run(args: argparse.Namespace) -> int:
    """Time the engine against the reference beam search; fail if they answer differently."""
    import torch

    from ..benchmarking import bench_model, engine_row, new_report, render_table, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["FASTCOMER_THREADS"] = str(args.threads)  # the engine's searches read it
    shapes = args.shape or (QUICK_IMAGE_SHAPES if args.quick else IMAGE_SHAPES)
    max_len = args.max_len or (QUICK_MAX_LEN if args.quick else MAX_LEN)
    model = bench_model(args.seed, args.device)
    check_model_limits(args.parser, model, max_len, args.beam_size)
    print(f"decoding {args.images} image(s) of each of {', '.join(f'{h}x{w}' for h, w in shapes)}, beam {args.beam_size}, "
          f"max_len {max_len}, on {args.device} with {torch.get_num_threads()} thread(s)", flush=True)
    report = new_report(torch.device(args.device), args.command_line)
    path = None
    for shape in shapes:  # the report is written after each shape, so a long run keeps what it measured
        report["rows"].append(engine_row(model, shape, args.images, args.beam_size, max_len, args.seed, args.batch,
                                         args.backend, {"auto": None, "on": True, "off": False}[args.graphs],
                                         log=lambda s: print(s, flush=True), workers=args.workers))
        path = write_report(report, args.out)
    print(render_table([(str(path or "not written"), report)]))
    if path is not None:
        print(f"wrote {path}")
    return 0 if all(row["checks"]["identical"] for row in report["rows"]) else 1
