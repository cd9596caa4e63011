"""The benchmark suite runs under pytest: `python -m pytest benchmarks/ [options]` (the files
are bench_*.py, collected as tests; `-k` picks cases). Each benchmark adds rows to the
session's report (fastcomer.benchmarking's schema), printed as tables at the end and written
as JSON to --bench-out. Timings use torch.utils.benchmark (see fastcomer.benchmarking.measure
for why), the end-to-end engine benchmark the wall clock of whole searches."""
from pathlib import Path

import pytest
import torch

from fastcomer.benchmarking import Report, copy_bandwidth, new_report, render_table, write_report

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REPORT = pytest.StashKey[Report]()


def pytest_addoption(parser):
    group = parser.getgroup("fastcomer benchmarks")
    group.addoption("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:n]")
    group.addoption("--smoke", action="store_true", help="tiny shapes and short timings: checks that the suite runs (seconds on CPU)")
    group.addoption("--bench-out", type=Path, help="write the report as JSON to this file, or into this directory")
    group.addoption("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the kernel benchmarks")
    group.addoption("--tf32", action="store_true", help="allow tf32 in float32 matmuls (every variant)")
    group.addoption("--train", action="store_true", help="ARM attention in training mode (BatchNorm batch statistics)")


def pytest_configure(config):
    device = torch.device(config.getoption("device", "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = config.getoption("tf32", False)
    torch.backends.cudnn.allow_tf32 = config.getoption("tf32", False)
    config.stash[REPORT] = new_report(device, "pytest " + " ".join(config.invocation_params.args))


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


@pytest.fixture(scope="session")
def add_row(pytestconfig):
    """add_row(row): record a measured row in the session's report."""
    return pytestconfig.stash[REPORT]["rows"].append


def pytest_sessionfinish(session):
    report = session.config.stash[REPORT]
    if report["rows"]:
        write_report(report, session.config.getoption("bench_out"))


def pytest_terminal_summary(terminalreporter, config):
    report = config.stash[REPORT]
    if report["rows"]:
        terminalreporter.section("fastcomer benchmarks")
        terminalreporter.write_line(render_table([(str(config.getoption("bench_out") or "not written"), report)]))

