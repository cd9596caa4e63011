"""The benchmark suite runs on CPU at its --smoke setting (seconds) and writes a report in the
shared schema with the rows it promises. The ARM attention benchmark needs Triton's
interpreter on CPU: tests/interpreter/test_bench_smoke.py runs it."""
import subprocess
import sys

from fastcomer.benchmarking import load_report
from support.paths import REPO


def test_step_and_engine_benchmarks_smoke(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_decode_step.py", "benchmarks/bench_beam_step.py",
                           "benchmarks/bench_engine.py", "--device", "cpu", "--smoke", "--bench-out", str(out),
                           "-q", "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    report = load_report(out)
    rows = {(row["benchmark"], row["name"]): row for row in report["rows"]}
    assert set(rows) == {("decode_step", "images=1 rows=2 L=64"), ("decode_step", "images=2 rows=4 L=64"),
                         ("beam_step", "images=1 L=64"), ("engine", "32x64 max_len=4 batch=1")}
    assert all(seconds > 0 for row in rows.values() for seconds in row["medians_s"].values())
    # on CPU: the torch step (triton needs the interpreter, cuda a GPU), eager beam steps
    assert rows["decode_step", "images=1 rows=2 L=64"]["subject"] == "torch"
    assert rows["decode_step", "images=1 rows=2 L=64"]["details"]["bytes_floor_s"] > 0
    assert rows["beam_step", "images=1 L=64"]["subject"] == "eager"
    engine = rows["engine", "32x64 max_len=4 batch=1"]
    assert engine["checks"]["identical"] and set(engine["speedups"]) == {"reference"}
    assert report["environment"]["device"] == "cpu" and report["command"].startswith("pytest benchmarks/")
    assert "fastcomer benchmarks" in done.stdout and "| images=1 L=64 (eager) |" in done.stdout
