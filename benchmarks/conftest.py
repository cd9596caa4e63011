"""The benchmark suite runs under pytest with pytest-benchmark: `python -m pytest benchmarks/
[options]` (the files are bench_*.py, collected as tests; `-k` picks cases). Every test times one
variant of one case with pytest-benchmark's `benchmark` fixture, so its options work as usual
(`--benchmark-json`, `--benchmark-save`, `--benchmark-compare`, `--benchmark-histogram`,
`--benchmark-min-time`, ...), and records what it measured (`record`). From the same run the
session's report in the project's schema (`fastcomer.benchmarking.Report`, one row per case,
its variants' medians side by side) is printed as tables at the end, written to --bench-out,
and added under the key "fastcomer" to pytest-benchmark's JSON (`fastcomer table`, `compare`
and `plot` read either file).

The timer is `fastcomer.benchmarking.synchronized_clock` unless --benchmark-timer names another:
it synchronises the CUDA device at the start and end of each round, a block of calls of at least
1 ms unless --benchmark-min-time says otherwise."""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest
import torch

from fastcomer.benchmarking import (Measured, Report, Row, copy_bandwidth, new_report, render_table, rows_from_measurements,
                                    write_report)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REPORT = pytest.StashKey[Report]()
UNAVAILABLE = pytest.StashKey[Dict[tuple, Dict[str, str]]]()
# pytest-benchmark's option: (its default, the suite's) where the command line leaves the default: the
# CUDA-synchronising clock, and rounds of at least 1 ms, so that a round's synchronisation (microseconds)
# is amortised over a block of kernels of microseconds each
SUITE_DEFAULTS = {"benchmark_timer": ("time.perf_counter", "fastcomer.benchmarking.synchronized_clock"),
                  "benchmark_min_time": ("0.000005", "0.001")}
SMOKE_TIMING = dict(benchmark_max_time="0.01", benchmark_min_rounds=1)  # --smoke: checks that the suite runs


def pytest_addoption(parser):
    group = parser.getgroup("fastcomer benchmarks")
    group.addoption("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:n]")
    group.addoption("--smoke", action="store_true", help="tiny shapes and short timings: checks that the suite runs (seconds on CPU)")
    group.addoption("--bench-out", type=Path, help="write the report (fastcomer's schema) as JSON to this file, or into this directory")
    group.addoption("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the kernel benchmarks")
    group.addoption("--tf32", action="store_true", help="allow tf32 in float32 matmuls (every variant)")
    group.addoption("--train", action="store_true", help="ARM attention in training mode (BatchNorm batch statistics)")


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError('the benchmark suite runs on pytest-benchmark: pip install "fastcomer[bench]"')
    # before pytest-benchmark's own pytest_configure (trylast), which reads its options
    from pytest_benchmark.utils import parse_seconds, parse_timer

    parse = dict(benchmark_timer=parse_timer, benchmark_min_time=parse_seconds)
    for name, (theirs, ours) in SUITE_DEFAULTS.items():
        if config.getoption(name) == parse[name](theirs):
            setattr(config.option, name, parse[name](ours))
    if config.getoption("smoke", False):
        for name, value in SMOKE_TIMING.items():
            setattr(config.option, name, type(getattr(config.option, name))(value))
    device = torch.device(config.getoption("device", "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = config.getoption("tf32", False)
    torch.backends.cudnn.allow_tf32 = config.getoption("tf32", False)
    config.stash[REPORT] = new_report(device, "pytest " + " ".join(config.invocation_params.args))
    config.stash[UNAVAILABLE] = {}


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return torch.device(pytestconfig.getoption("device"))


@pytest.fixture(scope="session")
def smoke(pytestconfig) -> bool:
    return pytestconfig.getoption("smoke")


@pytest.fixture(scope="session")
def dtype(pytestconfig) -> torch.dtype:
    return DTYPES[pytestconfig.getoption("dtype")]


@pytest.fixture(scope="session")
def bandwidth(device, smoke) -> float:
    """The device's copy rate, bytes per second: the step benchmarks' bytes floor."""
    return copy_bandwidth(device, 4 if smoke else 256 if device.type == "cuda" else 32)


class Recorder:
    """`record(benchmark, name, variant, subjects, params, checks, details)`: what this test timed
    with pytest-benchmark's fixture (see `fastcomer.benchmarking.Measured`);
    `record.rows(rows)`: whole rows, for a test that times its variants itself (the end-to-end and
    serving benchmarks: pytest-benchmark's figure is then the whole case);
    `record.unavailable(benchmark, name, variant, reason)`: skip a variant this machine cannot
    run, noted in its row's details."""

    def __init__(self, fixture, config):
        self.fixture, self.config = fixture, config

    def __call__(self, benchmark: str, name: str, variant: str, subjects: Sequence[str], params: Dict[str, Any],
                 checks: Optional[Dict[str, Any]] = None, details: Optional[Dict[str, Any]] = None) -> None:
        self.fixture.group = f"{benchmark} {name}"
        self.fixture.extra_info["fastcomer"] = Measured(benchmark=benchmark, name=name, variant=variant,
                                                        subjects=list(subjects), params=params, checks=checks or {},
                                                        details=details or {})

    def rows(self, rows: List[Row]) -> None:
        self.fixture.extra_info["fastcomer"] = {"rows": list(rows)}

    def unavailable(self, benchmark: str, name: str, variant: str, reason: str) -> None:
        self.config.stash[UNAVAILABLE].setdefault((benchmark, name), {})[variant] = reason
        pytest.skip(f"{variant} cannot run here: {reason}")


@pytest.fixture
def record(benchmark, pytestconfig) -> Recorder:
    return Recorder(benchmark, pytestconfig)


def session_report(config) -> Report:
    """The report of what pytest-benchmark measured so far (rows in the order they were measured)."""
    measured = [(bench.extra_info["fastcomer"], bench.stats.median) for bench in config._benchmarksession.benchmarks
                if bench and not bench.has_error and "fastcomer" in bench.extra_info]
    rows = rows_from_measurements(measured)
    for row in rows:
        unavailable = config.stash[UNAVAILABLE].get((row["benchmark"], row["name"]))
        if unavailable:
            row["details"]["unavailable"] = unavailable
    return Report(**{**config.stash[REPORT], "rows": rows})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """pytest-benchmark's JSON (--benchmark-json, --benchmark-save) carries the report too."""
    report = session_report(config)
    if report["rows"]:
        output_json["fastcomer"] = report


def pytest_sessionfinish(session):
    report = session_report(session.config)
    if report["rows"]:
        write_report(report, session.config.getoption("bench_out"))


def pytest_terminal_summary(terminalreporter, config):
    report = session_report(config)
    if report["rows"]:
        terminalreporter.section("fastcomer benchmarks")
        terminalreporter.write_line(render_table([(str(config.getoption("bench_out") or "not written"), report)]))
