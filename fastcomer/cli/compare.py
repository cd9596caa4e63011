"""`fastcomer compare BEFORE.json AFTER.json`: two result files, row by row."""
import argparse

from .arguments import result_file


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "compare", help="compare two benchmark result files row by row",
        description="For every row (benchmark and case) of both result files and every variant measured in both: "
        "the median of each and before / after (above 1: AFTER is faster).")
    parser.add_argument("before", type=result_file, help="result file (fastcomer.benchmarking's schema)")
    parser.add_argument("after", type=result_file, help="result file to compare with BEFORE")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..benchmarking import compare_reports, format_seconds, load_report, machine, unmatched_rows

    before, after = load_report(args.before), load_report(args.after)
    for label, path, report in (("before", args.before, before), ("after", args.after, after)):
        env = report["environment"]
        print(f"{label}: {path} ({report['date']}, {machine(report)}, torch {env['torch']}, fastcomer {env['fastcomer']})")
    lines = ["| benchmark | row | variant | before | after | before / after |", "|---|---|---|---|---|---|"]
    for entry in compare_reports(before, after):
        lines.append(f"| {entry['benchmark']} | {entry['name']} | {entry['variant']} | {format_seconds(entry['before_s'])} "
                     f"| {format_seconds(entry['after_s'])} | {entry['ratio']:.2f}x |")
    print("\n".join(lines))
    for label, keys in zip(("before", "after"), unmatched_rows(before, after)):
        if keys:
            print(f"only in {label}: {'; '.join(keys)}")
    return 0
