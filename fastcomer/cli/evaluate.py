"""`fastcomer evaluate`: score a checkpoint on data in CoMER's layout, as CoMER's test loop does."""
import argparse
import os
import sys
from pathlib import Path

from .arguments import device, positive_int


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "evaluate", help="score a checkpoint on CROHME-style data (ExpRate, <=1/2/3 token errors)",
        description="Decode every image of DATA's splits as CoMER's test loop does (its batches, preprocessing and "
        "search settings) and score the answers against the captions: ExpRate and within 1, 2, 3 token edits, per "
        "split. DATA: CoMER's data.zip, the same extracted, or one split's folder (caption.txt with the images or an "
        "img/ folder). Writes OUT/predictions.jsonl, OUT/metrics.json and OUT/result.zip (CoMER's format; one per "
        "split under OUT/<split>/ when there are several) and prints a table. Search settings default to the "
        "checkpoint's hyper_parameters, else beam 10, max_len 200, alpha 1.0.")
    parser.add_argument("data", type=Path, metavar="DATA", help="data.zip or a folder in its layout")
    parser.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT",
                        help="CoMER checkpoint (Lightning .ckpt as published, or a state dict)")
    parser.add_argument("--split", nargs="+", metavar="SPLIT", help="splits to score (default: all but train)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the result files")
    parser.add_argument("--batching", choices=["comer", "alone"], default="comer",
                        help="comer (default): CoMER's test batches, so its answers; alone: each image on its own")
    parser.add_argument("--beam-size", type=positive_int)
    parser.add_argument("--max-len", type=positive_int, help="tokens per answer, start token included")
    parser.add_argument("--alpha", type=float, help="length penalty exponent")
    parser.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:n] (default: %(default)s)")
    parser.add_argument("--workers", type=positive_int, help="CPU worker processes (default: the cores available)")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="only the first N captions of each split")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run in DIR")
    parser.add_argument("--compare", type=Path, metavar="OTHER.jsonl",
                        help="also list the images whose answer differs from another run's predictions.jsonl")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(run=run, parser=parser)


def _progress(enabled: bool):
    """A progress callback: tqdm's bar (images/s, ETA) when installed, else a plain one."""
    if not enabled:
        return None, lambda: None
    try:
        from tqdm import tqdm
    except ImportError:
        from .recognize import ProgressBar

        return ProgressBar(sys.stderr), lambda: None
    bar = tqdm(unit="img", file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def table(metrics: dict) -> str:
    """One row per split: images, scored, ExpRate and within 1/2/3 edits (percent), not scored."""
    rows = ["| split | images | scored | ExpRate | <=1 | <=2 | <=3 | not scored |", "|---|---|---|---|---|---|---|---|"]
    for split, m in metrics.items():
        rates = [f"{100 * m[k]:.2f}" if m[k] is not None else "-" for k in ("exprate", "within_1", "within_2", "within_3")]
        failed = ", ".join(f"{kind} {count}" for kind, count in sorted(m["not_scored"].items())) or "0"
        rows.append(f"| {split} | {m['images']} | {m['count']} | " + " | ".join(rates) + f" | {failed} |")
    return "\n".join(rows)


def _join_torchrun(device: str) -> tuple:
    """Under torchrun (WORLD_SIZE > 1): join its process group (nccl on GPUs, one per local
    rank; gloo on CPUs). Returns (the device of this process, whether this is process 0)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, True
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, dist.get_rank() == 0


def _leave_torchrun() -> None:
    """Leave the process group `_join_torchrun` joined: one left to the interpreter's exit can
    end the process in std::terminate while gloo's threads still run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    """Print the table; exit status 1 when some image was not scored, 2 for a usage error."""
    from ..checkpoint import CheckpointError
    from ..evaluation import CaptionError, evaluate
    from ..evaluation.outputs import changed_predictions

    if args.compare is not None and not args.compare.is_file():
        args.parser.error(f"--compare: no such file {str(args.compare)!r}")
    args.device, first = _join_torchrun(args.device)
    progress, close = _progress(first and not args.no_progress and sys.stderr.isatty())
    try:
        result = evaluate(args.checkpoint, args.data, args.split, args.out, batching=args.batching,
                          beam_size=args.beam_size, max_len=args.max_len, alpha=args.alpha, device=args.device,
                          workers=args.workers, resume=args.resume, limit=args.limit, progress=progress)
    except CheckpointError as err:
        args.parser.error(f"--checkpoint: {err}")
    except (CaptionError, FileExistsError, ValueError) as err:
        args.parser.error(str(err))
    finally:
        close()
        _leave_torchrun()
    if not first:  # process 0 reports
        return 1 if any(r["error"] is not None for r in result.records) else 0
    for record in result.records:
        if record["error"] is not None:
            print(f"fastcomer evaluate: {record['split']}/{record['name']}: {record['error']}", file=sys.stderr)
    print(table(result.metrics))
    if args.compare is not None:
        try:
            changes = changed_predictions(result.records, args.compare)
        except ValueError as err:
            args.parser.error(f"--compare: {err}")
        print(f"\n{len(changes)} answer(s) differ from {args.compare}")
        for split, name, theirs, ours in changes:
            print(f"{split}/{name}: {theirs} -> {ours}")
    zips = "result.zip" if len(result.metrics) == 1 else ", ".join(f"{split}/result.zip" for split in result.metrics)
    print(f"\nwrote {args.out}: predictions.jsonl, metrics.json, {zips}")
    return 1 if any(r["error"] is not None for r in result.records) else 0
