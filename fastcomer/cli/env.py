"""`fastcomer env`: versions, devices and which kernel backends can run (and why not)."""
import argparse


def add_parser(commands) -> None:
    parser = commands.add_parser("env", help="print versions, devices and which kernel backends can run")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..backends import env_report, format_env_report

    report = env_report()
    print(json.dumps(report, indent=2) if args.json else format_env_report(report))
    return 0
