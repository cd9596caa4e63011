"""Command line: `python -m fastcomer COMMAND` (also installed as `fastcomer`). Each command
is a module of this package with `add_parser(commands)` and the function it runs."""
import argparse
from typing import List, Optional

from . import bench, env, kernels

COMMANDS = (bench, env, kernels)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastcomer", description="fastcomer: fused kernels and a fast decoding engine for CoMER.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    args = parser.parse_args(argv)
    return args.run(args)
