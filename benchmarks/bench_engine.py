"""End to end: the decoding engine (`fastcomer.beam_search`, the subject) against CoMER's
reference beam search (the baseline) on the published configuration with seeded random
weights, one image per call; the answers must be identical. The same workload as
`python -m fastcomer bench` (fastcomer.benchmarking.engine_row), as a grid:
image size x max_len, so that the speed-up can be plotted against both.

    python -m pytest benchmarks/bench_engine.py --bench-out engine.json      # GPU: minutes
    python -m pytest benchmarks/bench_engine.py --device cpu --smoke          # CPU check
"""
import pytest

from fastcomer.benchmarking import bench_model, engine_row

CASES = [((128, 512), 60), ((128, 512), 200), ((256, 1024), 60), ((256, 1024), 200)]
SMOKE_CASES = [((32, 64), 4)]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = SMOKE_CASES if metafunc.config.getoption("smoke") else CASES
        metafunc.parametrize("case", cases, ids=[f"{h}x{w}-max_len{n}" for (h, w), n in cases])


@pytest.fixture(scope="module")
def model(device):
    return bench_model(0, str(device))


def test_engine(case, smoke, model, add_row):
    shape, max_len = case
    row = engine_row(model, shape, images=1, beam_size=2 if smoke else 10, max_len=max_len, log=lambda line: None)
    add_row(row)
    assert row["checks"]["identical"], "the engine and the reference answered differently"
