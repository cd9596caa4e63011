"""The step benchmarks run on CPU at a tiny setting and write the report they promise."""
import json
import subprocess
import sys

import pytest

from support.paths import REPO

BENCHMARKS = REPO / "benchmarks"


@pytest.mark.parametrize("script, args", [
    ("bench_decode_step.py", ["--images", "1,2", "--lengths", "64", "--rows-per-image", "2", "--backends", "torch"]),
    ("bench_beam_step.py", ["--images", "1", "--lengths", "256", "--modes", "eager"]),
])
def test_step_benchmark_smoke(tmp_path, script, args):
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, str(BENCHMARKS / script), "--device", "cpu", *args, "--warmup", "1", "--iters", "2",
                    "--out", str(out)], check=True, cwd=BENCHMARKS, capture_output=True)
    report = json.loads(out.read_text())
    assert {"date", "device", "environment", "copy_bandwidth_gb_s", "timing", "shapes", "results"} <= set(report)
    assert report["results"] and all(entry["ms"] > 0 and entry["floor_ms"] > 0 for entry in report["results"])
