"""Command line: `python -m fastcomer COMMAND` (also installed as `fastcomer`)."""
import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional


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
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
