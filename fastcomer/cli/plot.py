"""`fastcomer plot RESULTS... --out DIR`: figures drawn from result files (needs matplotlib:
`pip install "fastcomer[plot]"`):

- engine_speedup_vs_length.png: the engine's speed-up over the reference beam search against
  the decoded length (the longest first-pass hypothesis), one line per image size and machine;
- engine_speedup_vs_image_size.png: the same against the image's pixels, one line per max_len
  and machine;
- BENCHMARK_time.png for every other benchmark: the median time of the subject and of each
  baseline, per case (its row name), on a log scale.
"""
import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

from .arguments import output_folder, result_file

if TYPE_CHECKING:  # the commands import torch only when they run
    from ..benchmarking import Report

Points = Dict[str, List[Tuple[float, float]]]


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "plot", help="draw speed-up and kernel-time figures from benchmark result files (needs matplotlib)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=result_file, nargs="+", help="result files (fastcomer.benchmarking's schema)")
    parser.add_argument("--out", type=output_folder, required=True, help="directory for the PNG files")
    parser.set_defaults(run=run)


def engine_points(reports: Sequence["Report"], x: str) -> Points:
    """The engine rows' speed-ups as (x, speed-up) points per series; x is 'decoded_length'
    (series: image size and machine) or 'pixels' (series: max_len and machine)."""
    from ..benchmarking import machine

    series: Points = {}
    for report in reports:
        for row in report["rows"]:
            if row["benchmark"] != "engine":
                continue
            height, width = row["params"]["shape"]
            if x == "decoded_length":
                key, value = f"{height}x{width}, {machine(report)}", row["details"]["decoded_length"]
            else:
                key, value = f"max_len {row['params']['max_len']}, {machine(report)}", height * width
            series.setdefault(key, []).append((value, row["speedups"]["reference"]))
    return {key: sorted(points) for key, points in series.items()}


def kernel_times(reports: Sequence["Report"]) -> Dict[str, Tuple[List[str], Points]]:
    """Per benchmark other than the engine: its case names in order, and per variant the
    (case index, median seconds) points."""
    tables: Dict[str, Tuple[List[str], Points]] = {}
    for report in reports:
        for row in report["rows"]:
            if row["benchmark"] == "engine":
                continue
            cases, variants = tables.setdefault(row["benchmark"], ([], {}))
            if row["name"] not in cases:
                cases.append(row["name"])
            for variant, seconds in row["medians_s"].items():
                label = f"{variant} (subject)" if variant == row["subject"] else variant
                variants.setdefault(label, []).append((cases.index(row["name"]), seconds))
    return tables


def draw(reports: Sequence["Report"], out: Path) -> List[Path]:
    """Every figure the reports have data for, written into `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append(out / name)

    for x, label, name in (("decoded_length", "decoded length (longest first-pass hypothesis, tokens)", "engine_speedup_vs_length.png"),
                           ("pixels", "image size (pixels)", "engine_speedup_vs_image_size.png")):
        series = engine_points(reports, x)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for key, points in series.items():
            ax.plot(*zip(*points), marker="o", label=key)
        ax.set_xlabel(label)
        ax.set_ylabel("speed-up over the reference beam search (x)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        save(fig, name)
    for benchmark, (cases, variants) in kernel_times(reports).items():
        fig, ax = plt.subplots(figsize=(max(6.4, 0.6 * len(cases)), 4.4))
        for variant, points in variants.items():
            ax.plot(*zip(*points), marker="o", label=variant)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=45, ha="right", fontsize="small")
        ax.set_yscale("log")
        ax.set_ylabel("median time per call (s)")
        ax.set_title(benchmark)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
        save(fig, f"{benchmark}_time.png")
    return written


def run(args: argparse.Namespace) -> int:
    from ..benchmarking import load_report
    from ..extras import require

    require("plot", "matplotlib", purpose="fastcomer plot")
    written = draw([load_report(path) for path in args.results], args.out)
    if not written:
        raise SystemExit("fastcomer plot: the result files hold no rows to draw")
    for path in written:
        print(f"wrote {path}")
    return 0
