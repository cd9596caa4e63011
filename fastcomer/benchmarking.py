"""What every benchmark shares: the one result schema, the environment it records, the timer,
the decoding benchmark's workload (the engine against CoMER's reference beam search, with
seeded random weights: `python -m fastcomer bench`), and the tables and comparisons drawn
from result files.

A result file is a `Report`: when and where it was measured (`Environment`) and one `Row` per
measured case. A row names its benchmark ("engine", "cross_attention_step", "beam_step",
"arm_attention"; a file's rows of "decode_step", the cross-attention step's former name, are read
as "cross_attention_step") and its case (`name`, unique within the benchmark: `compare` matches rows of
two files by both), the case's shapes and settings (`params`), the median seconds per call
of every variant measured in the same run (`medians_s`: the `subject` and its baselines), the
subject's speed-up over each baseline (`speedups`: baseline median / subject median), checks
of the answers, benchmark-specific measurements (`details`), and `floor`, reserved for a FLOP
floor (`Floor`), None until computed.
"""
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypedDict, Union

import torch

from ._version import __version__
from .allocator import applied_settings
from .flop_floor import flop_floor
from .model.comer import CoMER
from .ops.dispatch import BackendRequest, parse_request, use_cuda_graphs
from .search.engine import beam_search
from .search.images import decode_images
from .search.reference import reference_beam_search
from .search.threads import intra_op_threads, search_threads
from .shapes import BEAM_SIZE, MAX_LEN
from .vocab import EOS_IDX, SOS_IDX

SCHEMA = "fastcomer.benchmark/1"
ENGINE_MODEL = "CoMER() published config, seeded random weights (fastcomer.benchmarking.bench_model), float32"


class Environment(TypedDict):
    """Where a report was measured. Fields a converted old report did not record are None."""

    device: str  # "cpu" or "cuda[:n]"
    cpu: Optional[str]  # CPU model name
    gpu: Optional[str]  # GPU name, None on CPU
    python: Optional[str]
    torch: Optional[str]
    triton: Optional[str]  # None when triton is not installed
    cuda: Optional[str]  # the CUDA version torch was built with
    fastcomer: Optional[str]
    threads: Optional[int]  # torch's CPU threads
    load_average: Optional[List[float]]  # 1, 5, 15 minutes, when the run started: other work slows CPU timings
    malloc: Optional[str]  # glibc malloc settings fastcomer applied (`fastcomer.allocator`), None: the system's


class Floor(TypedDict):
    """A row's FLOP floor (`fastcomer.flop_floor`, CPU rows of the engine benchmark): the FLOPs
    one image costs, the per-op rates measured on the same machine in the same run, and the
    subject's time over the floor (details: FLOPs by op, the floor's seconds per image, threads)."""

    flops_per_image: float
    rates_flop_s: Dict[str, float]
    ratio: float


class Row(TypedDict):
    benchmark: str
    name: str
    params: Dict[str, Any]
    subject: str
    medians_s: Dict[str, float]
    speedups: Dict[str, float]
    checks: Dict[str, Any]
    details: Dict[str, Any]
    floor: Optional[Floor]


class Report(TypedDict):
    schema: str
    date: str
    environment: Environment
    command: Optional[str]  # what produced it
    provenance: Optional[Dict[str, Any]]  # for a converted report: the fields of the original
    rows: List[Row]


# --- the schema --------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(device: torch.device) -> Environment:
    """The machine and software a benchmark runs on, now."""
    try:
        import triton

        triton_version: Optional[str] = triton.__version__
    except ImportError:
        triton_version = None
    return Environment(
        device=str(device),
        cpu=cpu_name(),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        python=platform.python_version(),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        fastcomer=__version__,
        threads=torch.get_num_threads(),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        malloc=applied_settings(),
    )


def new_report(device: torch.device, command: Optional[str] = None) -> Report:
    """An empty report stamped with the date and environment (`command`: default this process's argv)."""
    return Report(
        schema=SCHEMA,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        environment=environment(device),
        command=command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        provenance=None,
        rows=[],
    )


def make_row(
    benchmark: str,
    name: str,
    params: Dict[str, Any],
    subject: str,
    medians_s: Dict[str, float],
    checks: Optional[Dict[str, Any]] = None,
    details: Optional[Dict[str, Any]] = None,
) -> Row:
    """A row; the subject's speed-up over every other variant is computed here."""
    if subject not in medians_s:
        raise ValueError(f"subject {subject!r} is not among the measured variants {sorted(medians_s)}")
    speedups = {variant: seconds / medians_s[subject] for variant, seconds in medians_s.items() if variant != subject}
    return Row(benchmark=benchmark, name=name, params=params, subject=subject, medians_s=dict(medians_s),
               speedups=speedups, checks=checks or {}, details=details or {}, floor=None)


def check_report(report: Any) -> Report:
    """`report` itself when it follows the schema; else ValueError naming the first fault."""

    def need(mapping: Any, keys: Iterable[str], where: str) -> None:
        if not isinstance(mapping, dict):
            raise ValueError(f"{where} must be an object, got {type(mapping).__name__}")
        missing = [key for key in keys if key not in mapping]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")

    need(report, Report.__annotations__, "report")
    if report["schema"] != SCHEMA:
        raise ValueError(f"report schema is {report['schema']!r}, expected {SCHEMA!r}")
    need(report["environment"], Environment.__annotations__, "report.environment")
    if not isinstance(report["rows"], list):
        raise ValueError("report.rows must be a list")
    names = set()
    for i, row in enumerate(report["rows"]):
        where = f"report.rows[{i}]"
        need(row, Row.__annotations__, where)
        if (row["benchmark"], row["name"]) in names:
            raise ValueError(f"{where}: a second row {row['benchmark']} {row['name']!r}")
        names.add((row["benchmark"], row["name"]))
        medians = row["medians_s"]
        if row["subject"] not in medians or not all(isinstance(s, (int, float)) and s > 0 for s in medians.values()):
            raise ValueError(f"{where}: medians_s must hold positive seconds for the subject {row['subject']!r} and its baselines")
        if set(row["speedups"]) != set(medians) - {row["subject"]}:
            raise ValueError(f"{where}: speedups must name every baseline of medians_s")
        if row["floor"] is not None:
            need(row["floor"], Floor.__annotations__, f"{where}.floor")
    return report


def write_report(report: Report, out: Optional[Path]) -> Optional[Path]:
    """Write the report as JSON: into `out` when it is an existing directory (named by the
    report's date), else to the file `out`; nothing when `out` is None."""
    if out is None:
        return None
    check_report(report)
    path = out / f"bench-{report['date'].replace(':', '')}.json" if out.is_dir() else out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


# Benchmarks renamed since a result file was written: old name -> new (files are records, never rewritten).
RENAMED_BENCHMARKS = {"decode_step": "cross_attention_step"}


def load_report(path: Path) -> Report:
    """A result file, checked against the schema (ValueError naming the file otherwise): a report,
    or pytest-benchmark's JSON of a run of the suite (`--benchmark-json`, `--benchmark-save`),
    which holds the report under "fastcomer". Rows of a renamed benchmark get its current name."""
    try:
        data = json.loads(Path(path).read_text())
        if isinstance(data, dict) and "machine_info" in data and "benchmarks" in data:  # pytest-benchmark's
            if "fastcomer" not in data:
                raise ValueError("a pytest-benchmark file without the suite's report (not written by benchmarks/)")
            data = data["fastcomer"]
        report = check_report(data)
    except (ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: {err}") from None
    for row in report["rows"]:
        row["benchmark"] = RENAMED_BENCHMARKS.get(row["benchmark"], row["benchmark"])
    return report


# --- timing ------------------------------------------------------------------------------------

def measure(fn: Callable[[], Any], min_run_time: float = 0.2) -> float:
    """Median seconds per call of `fn`, by torch.utils.benchmark.Timer.blocked_autorange (blocks
    of calls for at least `min_run_time` seconds, the device synchronised around each block, a
    fixed torch thread count): the rates a benchmark measures beside its cases (a copy's
    bandwidth, a matmul's peak). The cases themselves are timed by pytest-benchmark, with
    `synchronized_clock`."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of a device-to-device copy of `megabytes` (read + write counted): the
    rate that turns the bytes a kernel must move into its floor."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = measure(lambda: dst.copy_(src), min_run_time=0.05)
    return 2 * src.numel() * src.element_size() / seconds


def synchronized_clock() -> float:
    """time.perf_counter once the CUDA device has finished the work queued on it (when CUDA is in
    use): the timer of the benchmark suite under pytest-benchmark. pytest-benchmark reads its
    timer before and after each round, a block of calls, so a round times the kernels it
    launched, not their launches, with one synchronisation per block rather than per call (as
    torch.utils.benchmark's blocked_autorange does)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
    """fn's result and its wall-clock seconds, CUDA synchronised around it: one call, such as a
    whole search whose answer is kept."""
    start = synchronized_clock()
    result = fn()
    return result, synchronized_clock() - start


# --- rows from pytest-benchmark's measurements ---------------------------------------------------

class Measured(TypedDict):
    """What a test of the suite measured with pytest-benchmark's fixture, kept in the fixture's
    `extra_info["fastcomer"]`: one variant of one row's case. The row's subject is the first of
    `subjects` that was measured (a variant this machine cannot run is skipped); its params are
    the first measurement's, its checks and details those of all its measurements merged."""

    benchmark: str
    name: str
    variant: str
    subjects: List[str]
    params: Dict[str, Any]
    checks: Dict[str, Any]
    details: Dict[str, Any]


def _merge(into: Dict[str, Any], more: Dict[str, Any]) -> None:
    """Merge `more` into `into`; dictionaries (per variant values) are merged key by key."""
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key] = {**into[key], **value}
        else:
            into.setdefault(key, value)


def rows_from_measurements(measurements: Iterable[Tuple[Union[Measured, Dict[str, List[Row]]], float]]) -> List[Row]:
    """One row per (benchmark, name) of (what a test measured, its median seconds per call)
    pairs, rows in the order of their first measurement. A measurement {"rows": [row, ...]}
    holds whole rows, timed by their test (the end-to-end and serving benchmarks), kept as they are."""
    cases: Dict[Tuple[str, str], Any] = {}
    for measured, median in measurements:
        for row in measured.get("rows", []):
            cases[row["benchmark"], row["name"]] = row
        if "rows" not in measured:
            cases.setdefault((measured["benchmark"], measured["name"]), []).append((measured, median))
    rows = []
    for (benchmark, name), entries in cases.items():
        if isinstance(entries, dict):
            rows.append(entries)
            continue
        medians = {measured["variant"]: median for measured, median in entries}
        first = entries[0][0]
        subject = next((v for v in first["subjects"] if v in medians), None)
        if subject is None:
            raise ValueError(f"{benchmark} {name!r}: none of the subjects {first['subjects']} was measured")
        checks: Dict[str, Any] = {}
        details: Dict[str, Any] = {}
        for measured, _ in entries:
            _merge(checks, measured["checks"])
            _merge(details, measured["details"])
        rows.append(make_row(benchmark, name, dict(first["params"]), subject, medians, checks, details))
    return rows


# --- the decoding benchmark's workload -----------------------------------------------------------

@torch.no_grad()
def scale_weights(
    model: CoMER, seed: int, end_bias: float, end_scale: float, arm_scale: float = 4.0, proj_scale: float = 2.0
) -> CoMER:
    """Make every part of a freshly initialised CoMER matter, as the golden file's weights
    do, in place; returns the model in eval mode. BatchNorm statistics are random, the ARM
    is strong enough to steer the attention, and the output projection is peaked, with end
    tokens (EOS, SOS) whose odds swing from step to step, so beams end at various lengths."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    arm = model.decoder.model.arm
    if arm is not None:
        arm.conv.weight.mul_(arm_scale)
        arm.proj.weight.mul_(arm_scale)
        bn = arm.post_norm.bn
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
    proj = model.decoder.proj
    proj.weight.mul_(proj_scale)
    proj.bias.copy_(torch.randn(proj.out_features, generator=gen))
    for end in (EOS_IDX, SOS_IDX):
        proj.weight[end] *= end_scale
        proj.bias[end] += end_bias
    return model.eval()


def bench_model(seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> CoMER:
    """The published configuration (`CoMER()` defaults) with seeded random weights."""
    torch.manual_seed(seed)
    return scale_weights(CoMER(), seed, end_bias=1.0, end_scale=4.0).to(device=device, dtype=dtype)


def bench_images(shape: Tuple[int, int], seed: int, count: int, device: str, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """`count` random images of exactly `shape`: img [count, 1, H, W], img_mask [count, H, W] (no padding)."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.rand(count, 1, *shape, generator=gen).to(device=device, dtype=dtype)
    return img, torch.zeros(count, *shape, dtype=torch.bool, device=device)


def engine_row_name(shape: Sequence[int], max_len: int, batch: int) -> str:
    return f"{shape[0]}x{shape[1]} max_len={max_len} batch={batch}"


def engine_row(
    model: CoMER,
    shape: Tuple[int, int],
    images: int,
    beam_size: int = BEAM_SIZE,
    max_len: int = MAX_LEN,
    seed: int = 0,
    batch: int = 1,
    backend: BackendRequest = None,
    graphs: Optional[bool] = None,
    log: Callable[[str], None] = print,
    workers: int = 1,
) -> Row:
    """Decode `images` random images of `shape`, `batch` per call, with the engine and with the
    reference beam search; check that they answer identically. The row's medians are seconds
    per image (per call / batch); its details keep every call's seconds. With workers > 1
    (CPU), also the engine's seconds per image for all the images at once through
    `decode_images`, in one process and spread over that many worker processes, and the
    throughput ratio. On CPU the row's floor is the engine's FLOP floor."""
    if images % batch:
        raise ValueError(f"images ({images}) must be a multiple of batch ({batch})")
    device = next(model.parameters()).device
    search = dict(beam_size=beam_size, max_len=max_len)
    engine = dict(backend=backend, graphs=graphs)
    engine_s, cold_s, reference_s, lengths, identical = [], [], [], [], True
    for k in range(0, images, batch):
        img, mask = bench_images(shape, seed + k, batch, str(device), torch.float32)
        label = f"{shape[0]}x{shape[1]} images {k + 1}-{k + batch}/{images}"
        # The first search warms up (allocator, kernel compilation, graph capture: kept for later
        # searches of the same settings); its time is kept apart as the cold start.
        cold_s.append(timed(lambda: beam_search(model, img, mask, **search, **engine))[1])
        fast, seconds = timed(lambda: beam_search(model, img, mask, **search, return_details=True, **engine))
        engine_s.append(seconds)
        log(f"{label}: engine {seconds:.2f} s; reference running ...")
        slow, seconds = timed(lambda: reference_beam_search(model, img, mask, **search))
        reference_s.append(seconds)
        same = [h.seq for h in fast.hyps] == [h.seq for h in slow]
        identical &= same
        lengths += [len(h) for h in fast.first_pass_hyps]
        log(f"{label}: reference {seconds:.2f} s, {reference_s[-1] / engine_s[-1]:.1f}x, answers {'identical' if same else 'DIFFER'}")
    # The encoder alone, at the searches' threads: its share of the engine's time per image.
    with torch.inference_mode(), intra_op_threads(search_threads(None)):
        model.encoder(img, mask)  # warm-up
        encoder_s = statistics.median(timed(lambda: model.encoder(img, mask))[1] for _ in range(5)) / batch
    log(f"{shape[0]}x{shape[1]}: encoder {encoder_s * 1e3:.1f} ms/image of the engine's {statistics.median(engine_s) / batch:.3f} s")
    params = dict(shape=list(shape), images=images, batch=batch, **search, alpha=1.0, early_stopping=False, temperature=1.0,
                  direction="both", backend=parse_request(backend), cuda_graphs=use_cuda_graphs(device, graphs),
                  model=ENGINE_MODEL, seed=seed)
    medians = {"engine": statistics.median(engine_s) / batch, "reference": statistics.median(reference_s) / batch}
    details = dict(engine_s=engine_s, engine_cold_s=cold_s, reference_s=reference_s, hyp_lengths=lengths,
                   decoded_length=max(lengths), encoder_s_per_image=encoder_s,
                   decoder_s_per_image=medians["engine"] - encoder_s, engine_threads=search_threads(None))
    if device.type == "cpu" and (os.cpu_count() or 1) >= 2:
        # The last call's latency on 1 and on 2 intra-op threads: what one request gains from a second core.
        by_threads = {}
        for threads in (1, 2):
            beam_search(model, img, mask, threads=threads, **search, **engine)  # warm-up
            by_threads[str(threads)] = statistics.median(
                timed(lambda: beam_search(model, img, mask, threads=threads, **search, **engine))[1] for _ in range(3)) / batch
        details["engine_s_by_threads"] = by_threads
        log(f"{shape[0]}x{shape[1]}: engine {by_threads['1']:.3f} s/image on 1 thread, {by_threads['2']:.3f} on 2 "
            f"({by_threads['2'] / by_threads['1']:.2f}x)")
    if workers > 1:
        # Both through decode_images, one after the other: one process (this one, warm), then
        # `workers` forked worker processes (their start included, as a caller pays it).
        every = [im for k in range(images) for im in bench_images(shape, seed + k, 1, str(device), torch.float32)[0]]
        one_s = timed(lambda: decode_images(model, every, workers=1, **search, **engine))[1]
        spread_s = timed(lambda: decode_images(model, every, workers=workers, **search, **engine))[1]
        details.update(workers=workers, engine_one_process_s_per_image=one_s / images,
                       engine_spread_s_per_image=spread_s / images, workers_throughput=one_s / spread_s)
        log(f"{shape[0]}x{shape[1]}: {images} images, {one_s / images:.2f} s/image in one process, "
            f"{spread_s / images:.2f} s/image on {workers} workers: {one_s / spread_s:.2f}x the throughput")
    row = make_row("engine", engine_row_name(shape, max_len, batch), params, "engine", medians,
                   checks={"identical": identical}, details=details)
    if device.type == "cpu":
        floor = flop_floor(model, img, mask, **search, backend=backend)
        row["floor"] = {"flops_per_image": floor["flops_per_image"],
                        "rates_flop_s": {kind: rate * 1e9 for kind, rate in floor["rates_gflop_s"].items()},
                        "ratio": medians["engine"] / floor["floor_s_per_image"], "details": floor}
        encoder_floor = floor["encoder_floor_s_per_image"]
        details.update(encoder_floor_ratio=encoder_s / encoder_floor,
                       decoder_floor_ratio=(medians["engine"] - encoder_s) / (floor["floor_s_per_image"] - encoder_floor))
        log(f"{shape[0]}x{shape[1]}: engine {row['floor']['ratio']:.2f}x its FLOP floor "
            f"({floor['floor_s_per_image']:.3f} s/image, {floor['flops_per_image'] / 1e9:.1f} GFLOP per image); "
            f"encoder {details['encoder_floor_ratio']:.2f}x its floor ({encoder_floor * 1e3:.1f} ms, "
            f"{floor['encoder_flops_per_image'] / 1e9:.1f} GFLOP), decoder {details['decoder_floor_ratio']:.2f}x its")
    return row


# --- tables and comparisons ----------------------------------------------------------------------

def format_seconds(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}" if unit != "s" else f"{seconds:.3f} s"
    return f"{seconds / 1e-9:.3g} ns"


def machine(report: Report) -> str:
    env = report["environment"]
    threads = f", {env['threads']} threads" if env["threads"] and not env["gpu"] else ""
    return f"{env['gpu'] or env['cpu'] or env['device']}{threads}"


def load_1min(report: Report) -> str:
    load = report["environment"]["load_average"]
    return f"{load[0]:.1f}" if load else "not recorded"


def render_table(results: Sequence[Tuple[str, Report]]) -> str:
    """Markdown tables of (label, report) pairs, one table per benchmark, rows in file order.
    Engine rows: seconds per image of both searches, the speed-up, the engine's time over its
    FLOP floor and its throughput on worker processes over one process (where measured), and
    whether the answers were identical; other rows: every variant's median and the subject's speed-ups."""
    by_benchmark: Dict[str, List[Tuple[str, Report, Row]]] = {}
    for label, report in results:
        for row in report["rows"]:
            by_benchmark.setdefault(row["benchmark"], []).append((label, report, row))
    tables = []
    for benchmark, entries in by_benchmark.items():
        if benchmark == "engine":
            lines = ["| image | max_len | per call | reference s/image | engine s/image | speed-up | engine / FLOP floor "
                     "| encoder / its floor | engine threads | 1 / 2 threads s/image | workers: throughput | answers "
                     "| first-pass lengths min/median/max | machine | load (1 min) | file |",
                     "|---" * 16 + "|"]
            for label, report, row in entries:
                p, details, lengths = row["params"], row["details"], row["details"]["hyp_lengths"]
                floor = f"{row['floor']['ratio']:.2f}x" if row["floor"] else "not measured"
                encoder = f"{details['encoder_floor_ratio']:.2f}x" if "encoder_floor_ratio" in details else "not measured"
                by_threads = details.get("engine_s_by_threads")
                latency = f"{by_threads['1']:.2f} / {by_threads['2']:.2f}" if by_threads else "not measured"
                spread = (f"{details['workers']}: {details['workers_throughput']:.2f}x" if "workers_throughput" in details
                          else "not measured")
                lines.append(
                    f"| {p['shape'][0]}x{p['shape'][1]} | {p['max_len']} | {p['batch']} | {row['medians_s']['reference']:.2f} "
                    f"| {row['medians_s']['engine']:.2f} | {row['speedups']['reference']:.1f}x | {floor} | {encoder} "
                    f"| {details.get('engine_threads', 'not recorded')} | {latency} | {spread} "
                    f"| {'identical' if row['checks']['identical'] else 'DIFFER'} "
                    f"| {min(lengths)}/{statistics.median(lengths):g}/{max(lengths)} | {machine(report)} "
                    f"| {load_1min(report)} | `{label}` |")
        else:
            variants = list(dict.fromkeys(v for _, _, row in entries for v in row["medians_s"]))
            baselines = list(dict.fromkeys(b for _, _, row in entries for b in row["speedups"]))
            header = [benchmark, *variants, *(f"speed-up vs {b}" for b in baselines), "machine", "file"]
            lines = [f"| {' | '.join(header)} |", "|---" * len(header) + "|"]
            for label, report, row in entries:
                times = [format_seconds(row["medians_s"][v]) if v in row["medians_s"] else "" for v in variants]
                ratios = [f"{row['speedups'][b]:.2f}x" if b in row["speedups"] else "" for b in baselines]
                cells = [f"{row['name']} ({row['subject']})", *times, *ratios, machine(report), f"`{label}`"]
                lines.append(f"| {' | '.join(cells)} |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


TABLE_BLOCK = re.compile(r"(<!-- results-table: (?P<files>[^>]*?) -->\n)(?P<table>.*?)(<!-- end results-table -->)", re.S)


def update_readme_tables(text: str, root: Path) -> str:
    """`text` with every results-table block regenerated from the result files its opening
    marker names (paths relative to `root`):

        <!-- results-table: benchmarks/results/a.json benchmarks/results/b.json -->
        (the table, generated)
        <!-- end results-table -->
    """

    def regenerate(match: "re.Match[str]") -> str:
        files = match.group("files").split()
        table = render_table([(Path(f).name, load_report(root / f)) for f in files])
        return f"{match.group(1)}{table}\n{match.group(4)}"

    return TABLE_BLOCK.sub(regenerate, text)


def compare_reports(before: Report, after: Report) -> List[Dict[str, Any]]:
    """Row by row (rows matched by benchmark and name) and variant by variant: the median in
    each report and before / after (above 1: faster after). Rows in one report only get no
    entry; see `unmatched_rows`."""
    after_rows = {(row["benchmark"], row["name"]): row for row in after["rows"]}
    entries = []
    for row in before["rows"]:
        other = after_rows.get((row["benchmark"], row["name"]))
        if other is None:
            continue
        for variant, seconds in row["medians_s"].items():
            if variant in other["medians_s"]:
                entries.append(dict(benchmark=row["benchmark"], name=row["name"], variant=variant, before_s=seconds,
                                    after_s=other["medians_s"][variant], ratio=seconds / other["medians_s"][variant]))
    return entries


def unmatched_rows(before: Report, after: Report) -> Tuple[List[str], List[str]]:
    """The rows (benchmark and name) found only in `before`, and only in `after`."""
    keys = [{f"{row['benchmark']} {row['name']}" for row in report["rows"]} for report in (before, after)]
    return sorted(keys[0] - keys[1]), sorted(keys[1] - keys[0])
