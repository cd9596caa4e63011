"""The ARM attention benchmark runs at its tiny CPU smoke shape through Triton's interpreter
and its variants agree (layer level: the interpreter makes the whole decoder slow, and
test_patch.py checks the fused decoder)."""
import os
import subprocess
import sys

from fastcomer.benchmarking import load_report
from support.paths import REPO


def test_arm_attention_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_arm_attention.py", "--device", "cpu", "--smoke",
                           "-k", "layer", "--bench-out", str(out), "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = load_report(out)["rows"]
    assert [row["params"]["mode"] for row in rows] == ["forward", "forward_backward"]
    for row in rows:
        assert row["params"]["level"] == "layer" and row["subject"] == "fused"
        assert set(row["medians_s"]) == {"fused", "eager", "composite"}
    errors = rows[0]["checks"]["max_rel_err_vs_eager"]
    assert set(errors) == {"fused", "eager", "composite"} and max(errors.values()) < 1e-5
