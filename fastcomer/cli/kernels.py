"""`fastcomer kernels`: the static GPU report (compiled, not run; see fastcomer.kernel_report)."""
import argparse

from .arguments import output_file


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "kernels", help="compile every kernel variant for a GPU arch (no GPU needed) and report registers, spills, "
                        "occupancy, tensor-core use and roofline estimates")
    parser.add_argument("--arch", choices=["sm_90", "sm_80"], default="sm_90", help="target architecture")
    parser.add_argument("--shapes", choices=["published", "small"], default="published",
                        help="shape set: CoMER's published training shapes, or a small CI-sized one")
    parser.add_argument("--dtypes", metavar="MODE,...",
                        help="only these dtype modes (e.g. fp32,bf16; the providers' 'dtype' field); default: all")
    parser.add_argument("--json", metavar="FILE", type=output_file, help="also write the report as JSON to FILE")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA extension (nvcc)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..kernel_report import format_report, report

    modes = set(args.dtypes.split(",")) if args.dtypes else None
    select = None if modes is None else (lambda variant: variant.dtype in modes)
    result = report(args.arch, args.shapes, select=select, cuda=not args.no_cuda)
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
