"""End to end: the decoding engine (`fastcomer.beam_search`, the subject) against CoMER's
reference beam search (the baseline) on the published configuration with seeded random
weights, one image per call; the answers must be identical. The same workload as
`python -m fastcomer bench` (fastcomer.benchmarking.engine_row), as a grid: the published
image shapes (`fastcomer.shapes`) x max_len, so that the speed-up can be plotted against both.

engine_row times each search itself (the engine and the reference alternate on the same
images, and their answers are compared), so one test is the whole case: pytest-benchmark
times it once, and the row's medians are engine_row's seconds per image.

    python -m pytest benchmarks/bench_engine.py --bench-out engine.json      # GPU: minutes
    python -m pytest benchmarks/bench_engine.py --device cpu --smoke          # CPU check
"""
import pytest

from fastcomer.benchmarking import bench_model, engine_row, engine_row_name
from fastcomer.shapes import BEAM_SIZE, IMAGE_SHAPES, MAX_LEN, QUICK_MAX_LEN

CASES = [(shape, max_len) for shape in IMAGE_SHAPES for max_len in (QUICK_MAX_LEN, MAX_LEN)]
SMOKE_CASES = [((32, 64), 4)]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = SMOKE_CASES if metafunc.config.getoption("smoke") else CASES
        metafunc.parametrize("case", cases, ids=[f"{h}x{w}-max_len{n}" for (h, w), n in cases])


@pytest.fixture(scope="module")
def model(device):
    return bench_model(0, str(device))


def test_engine(case, smoke, model, benchmark, record):
    shape, max_len = case
    benchmark.group = f"engine {engine_row_name(shape, max_len, 1)}"
    row = benchmark.pedantic(engine_row, args=(model, shape), rounds=1,
                             kwargs=dict(images=1, beam_size=2 if smoke else BEAM_SIZE, max_len=max_len, log=lambda line: None))
    record.rows([row])
    assert row["checks"]["identical"], "the engine and the reference answered differently"
