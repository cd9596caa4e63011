"""Command line: `python -m fastcomer COMMAND` (also installed as `fastcomer`)."""
import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple


def default_golden() -> Path:
    return Path.cwd().parent / "shared" / "golden" / "comer_small_seed0.pt"


def decode_golden(args: argparse.Namespace) -> int:
    """Decode the golden file's three images with the reference beam search."""
    import torch

    from . import load_comer, reference_beam_search, vocab

    if args.threads:
        torch.set_num_threads(args.threads)
    golden = torch.load(args.golden, weights_only=False)
    model = load_comer(golden)
    start = time.perf_counter()
    hyps = reference_beam_search(model, golden["imgs"], golden["img_mask"], **golden["beam_config"])
    elapsed = time.perf_counter() - start
    for i, (hyp, expected) in enumerate(zip(hyps, golden["beam_hyps"])):
        mark = "matches CoMER" if hyp.seq == expected else "DIFFERS from CoMER"
        print(f"image {i}: score {hyp.score:.6f} ({mark})\n  {vocab.indices2label(hyp.seq)}")
    print(f"reference beam search: {elapsed:.2f} s for {len(hyps)} images ({golden['beam_config']})")
    return 0 if [h.seq for h in hyps] == golden["beam_hyps"] else 1


def print_env(args: argparse.Namespace) -> int:
    """Versions, devices and which kernel backends can run (and why not)."""
    import json

    from .backend import env_report, format_env_report

    report = env_report()
    print(json.dumps(report, indent=2) if args.json else format_env_report(report))
    return 0


def bench(args: argparse.Namespace) -> int:
    """Time the engine against the reference beam search; fail if they answer differently."""
    import torch

    from .bench import FULL_SHAPES, QUICK_SHAPES, format_table, run_benchmark, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shape or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    max_len = args.max_len or (60 if args.quick else 200)
    print(f"decoding {args.images} image(s) of each of {', '.join(f'{h}x{w}' for h, w in shapes)}, beam {args.beam_size}, "
          f"max_len {max_len}, on {args.device} with {torch.get_num_threads()} thread(s)", flush=True)
    report = None
    for shape in shapes:  # the report is written after each shape, so a long run keeps what it measured
        part = run_benchmark([shape], args.images, args.beam_size, max_len, args.device, args.seed,
                             log=lambda s: print(s, flush=True), batch=args.batch, backend=args.backend,
                             graphs={"auto": None, "on": True, "off": False}[args.graphs])
        if report is None:
            report = part
        else:
            report["results"] += part["results"]
        path = write_report(report, args.out)
    print(format_table(report))
    if path is not None:
        print(f"wrote {path}")
    return 0 if all(row["identical"] for row in report["results"]) else 1


def image_shape(text: str) -> Tuple[int, int]:
    try:
        height, width = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 128x512, got {text!r}") from None
    return height, width


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastcomer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    golden = commands.add_parser("golden", help="decode the golden file's images with the reference beam search")
    golden.add_argument("--golden", type=Path, default=default_golden(), help="path of comer_small_seed0.pt (default: %(default)s)")
    golden.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    golden.set_defaults(run=decode_golden)
    env = commands.add_parser("env", help="print versions, devices and which kernel backends can run")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.set_defaults(run=print_env)
    timing = commands.add_parser(
        "bench",
        help="time the decoding engine against the reference beam search (published config, random weights)",
        description="Decode random images with the published CoMER configuration (seeded random weights scaled so "
        "that beams end at various lengths), one image per call, with the engine and with the reference beam "
        "search; check that they answer identically; print the time per image of each and the ratio. Default: "
        "one image of 128x512 and one of 256x1024 (--images for more), beam 10, max_len 200; on 2 CPU cores the "
        "reference needs minutes per image. --quick: 128x512 only, max_len 60 (under a minute on 2 idle CPU "
        "cores; the ratio grows with the decoded length, so it understates the full run's).",
    )
    timing.add_argument("--quick", action="store_true", help="128x512 only, max_len 60")
    timing.add_argument("--shape", type=image_shape, action="append", help="HEIGHTxWIDTH, repeatable (default: 128x512 and 256x1024)")
    timing.add_argument("--images", type=int, default=1, help="images per shape (default: %(default)s)")
    timing.add_argument("--batch", type=int, default=1, help="images per call, --images is a multiple of it (default: %(default)s)")
    timing.add_argument("--backend", choices=["auto", "cuda", "triton", "torch"], help="the engine's cross-attention step (default: $FASTCOMER_BACKEND, else auto)")
    timing.add_argument("--graphs", choices=["auto", "on", "off"], default="auto",
                        help="replay the engine's steps as CUDA graphs (default: $FASTCOMER_CUDA_GRAPHS, else on for CUDA)")
    timing.add_argument("--max-len", type=int, default=0, help="default: 200, or 60 with --quick")
    timing.add_argument("--beam-size", type=int, default=10)
    timing.add_argument("--device", default="cpu", help="cpu or cuda[:n] (default: %(default)s)")
    timing.add_argument("--seed", type=int, default=0)
    timing.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    timing.add_argument("--out", type=Path, help="write the results as JSON to this file, or into this directory")
    timing.set_defaults(run=bench)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
