"""`fastcomer table RESULTS...`: result files as markdown tables; `--readme FILE...` regenerates
the generated tables of markdown files (the blocks between `<!-- results-table: FILES -->` and
`<!-- end results-table -->`; the README's and docs/benchmarks.md's) from the files their markers name."""
import argparse
import sys

from .arguments import input_file, result_file


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "table", help="print benchmark result files as markdown tables, or regenerate the tables of markdown files",
        description="Print the rows of result files as markdown tables (one per benchmark). With --readme FILE..., "
        "rewrite instead every block of each FILE between '<!-- results-table: PATHS -->' and '<!-- end results-table -->' "
        "from the result files PATHS (relative to FILE's directory); the repository's are README.md and docs/benchmarks.md.")
    parser.add_argument("results", type=result_file, nargs="*", help="result files (fastcomer.benchmarking's schema)")
    parser.add_argument("--readme", type=input_file, nargs="+", metavar="FILE",
                        help="regenerate the results tables of these markdown files in place")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..benchmarking import load_report, render_table, update_readme_tables

    if args.readme is not None:
        for path in args.readme:
            text = path.read_text()
            try:
                updated = update_readme_tables(text, path.resolve().parent)
            except (ValueError, OSError) as err:  # a result file its markers name is missing or off the schema
                print(f"fastcomer table: {path}: {err}", file=sys.stderr)
                return 1
            path.write_text(updated)
            print(f"{path}: tables {'regenerated' if updated != text else 'already up to date'}")
        return 0
    if not args.results:
        raise SystemExit("fastcomer table: give result files, or --readme FILE")
    print(render_table([(path.name, load_report(path)) for path in args.results]))
    return 0
