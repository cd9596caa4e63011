"""The benchmark script runs and its variants agree, on its tiny CPU smoke shape (layer level:
the interpreter makes the whole decoder slow, and test_patch.py checks the fused decoder)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_arm_attention.py"), "--smoke", "--levels", "layer", "--out", str(out)],
                   check=True, env=env, cwd=REPO, capture_output=True)
    report = json.loads(out.read_text())
    assert {"device", "date", "versions", "config", "rows"} <= set(report)
    assert [row["level"] for row in report["rows"]] == ["layer"]  # the decoder level: see test_patch.py
    for row in report["rows"]:
        for name, result in row["results"].items():
            assert result["max_rel_err_vs_eager"] < 1e-5, (row["level"], name)
            assert result["forward"]["ms"] > 0 and result["forward_backward"]["ms"] > 0
