"""`fastcomer env`: versions, devices, which kernel backends can run (and why not), and the plan a
search would take (which backend runs each op)."""
import argparse


def add_parser(commands) -> None:
    parser = commands.add_parser("env", help="print versions, devices, which kernel backends can run and the dispatch plan")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--backend", help="the plan for this request instead of $FASTCOMER_BACKEND (auto, cuda, triton, "
                                          "torch, or op=backend,...)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..ops.dispatch import env_report, format_env_report, parse_env_text

    report = env_report(None if args.backend is None else parse_env_text(args.backend))
    print(json.dumps(report, indent=2) if args.json else format_env_report(report))
    return 0
