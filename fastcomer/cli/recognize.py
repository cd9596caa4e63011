"""`fastcomer recognize`: image files to LaTeX with a CoMER checkpoint."""
import argparse
import sys
from pathlib import Path
from typing import List

from .arguments import check_model_limits, device, load_checkpoint, max_len, positive_int

IMAGE_SUFFIXES = {".bmp", ".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "recognize",
        help="image files to LaTeX with a CoMER checkpoint",
        description="Recognise handwritten maths: each IMAGE (a file, or a folder: its image files) is prepared as "
        "CoMER evaluates it (grayscale, scaled into 16..256 x 16..1024, dark-on-light inverted), decoded by the "
        "engine's beam search, and printed as one line 'PATH<TAB>LATEX' (or a JSON object with --json). An image "
        "that cannot be read is reported on stderr and the exit status is 1.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", type=Path, help="image files or folders")
    parser.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT",
                        help="CoMER checkpoint (Lightning .ckpt as published, or a state dict)")
    parser.add_argument("--beam-size", type=positive_int, default=10, help="default: %(default)s")
    parser.add_argument("--max-len", type=max_len, default=200, help="tokens per answer, start token included (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (default: %(default)s)")
    parser.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:n] (default: %(default)s)")
    parser.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                        help="invert dark-on-light images: auto (default) when an image is mostly light")
    parser.add_argument("--max-pixels", type=positive_int, metavar="N",
                        help="pixels of one image before scaling, at most; a larger image is reported as failed "
                             "(default: fastcomer.recognize.DEFAULT_MAX_PIXELS, 64 Mi)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image: path, latex, tokens, score, error")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(run=run, parser=parser)


def image_paths(arguments: List[Path]) -> List[Path]:
    """The files named, and the image files of the folders named (sorted)."""
    paths = []
    for path in arguments:
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            paths.append(path)
    return paths


class ProgressBar:
    """`[#####.....] 50/100 images` on stderr, redrawn in place."""

    WIDTH = 30

    def __init__(self, stream):
        self.stream = stream

    def __call__(self, done: int, total: int) -> None:
        filled = self.WIDTH * done // max(total, 1)
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total} images")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def run(args: argparse.Namespace) -> int:
    """Print each image's LaTeX; exit status 1 when any image failed, 2 for a usage error."""
    import json

    import torch

    from ..extras import require
    from ..recognize import DEFAULT_MAX_PIXELS, recognize

    require("images", "PIL", purpose="fastcomer recognize")
    paths = image_paths(args.images)
    if not paths:
        args.parser.error("no image files found in the folders given")
    model = load_checkpoint(args.parser, args.checkpoint, args.device)
    check_model_limits(args.parser, model, args.max_len, args.beam_size)
    show_progress = not args.no_progress and sys.stderr.isatty() and len(paths) > args.batch_size
    with torch.inference_mode():
        results = recognize(model, paths, beam_size=args.beam_size, max_len=args.max_len, batch_size=args.batch_size,
                            invert={"auto": "auto", "yes": True, "no": False}[args.invert], details=True,
                            max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
                            progress=ProgressBar(sys.stderr) if show_progress else None)
    for result in results:
        if args.json:
            print(json.dumps({"path": result.name, "latex": result.latex, "tokens": result.tokens,
                              "score": result.score, "error": result.error}))
        elif result.error is None:
            print(f"{result.name}\t{result.latex}")
        if result.error is not None:
            print(f"fastcomer recognize: {result.name}: {result.error}", file=sys.stderr)
    return 1 if any(r.error is not None for r in results) else 0
