"""Command line: `python -m fastcomer COMMAND` (also installed as `fastcomer`). Each command
is a module of this package with `add_parser(commands)` and the function it runs. Exit
status: 0 done, 1 a failure (a bad image, a missing optional dependency), 2 a usage error
(argparse's one line, from the checks of `arguments.py`), never a traceback for either."""
import argparse
import shlex
import sys
from typing import List, Optional

from ..allocator import keep_freed_memory
from ..extras import MissingExtra
from . import bench, compare, env, evaluate, export_onnx, kernels, plot, recognize, serve, table

COMMANDS = (bench, recognize, evaluate, serve, env, compare, table, plot, kernels, export_onnx)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastcomer", description="fastcomer: fused kernels and a fast decoding engine for CoMER.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = "fastcomer " + " ".join(shlex.quote(arg) for arg in argv)  # recorded in result files
    keep_freed_memory()  # fastcomer's own process; FASTCOMER_MALLOC=system leaves malloc alone
    try:
        return args.run(args)
    except MissingExtra as err:  # one line naming the extra, not a traceback
        print(err, file=sys.stderr)
        return 1
