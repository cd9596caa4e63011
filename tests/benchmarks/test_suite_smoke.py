"""The benchmark suite runs on CPU at its --smoke setting (seconds) under pytest-benchmark, and
one run writes both pytest-benchmark's JSON and a report in the project's schema with the rows
it promises. The ARM attention benchmark needs Triton's interpreter on CPU:
tests/interpreter/test_bench_smoke.py runs it."""
import json
import subprocess
import sys

from fastcomer.benchmarking import load_report
from support.paths import REPO


def test_step_and_engine_benchmarks_smoke(tmp_path):
    out, pytest_json = tmp_path / "report.json", tmp_path / "pytest-benchmark.json"
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_cross_attention_step.py",
                           "benchmarks/bench_beam_step.py", "benchmarks/bench_engine.py", "--device", "cpu", "--smoke",
                           "--bench-out", str(out), "--benchmark-json", str(pytest_json), "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    report = load_report(out)
    assert load_report(pytest_json) == report  # the same run's report, inside pytest-benchmark's file
    rows = {(row["benchmark"], row["name"]): row for row in report["rows"]}
    step = ("cross_attention_step", "images=1 rows=2 L=64")
    assert set(rows) == {step, ("cross_attention_step", "images=2 rows=4 L=64"), ("beam_step", "images=1 L=64"),
                         ("engine", "32x64 max_len=4 batch=1")}
    assert all(seconds > 0 for row in rows.values() for seconds in row["medians_s"].values())
    # on CPU: the torch step (triton needs the interpreter, cuda a GPU: skipped, noted), eager beam steps
    assert rows[step]["subject"] == "torch" and set(rows[step]["details"]["unavailable"]) == {"cuda", "triton"}
    assert rows[step]["details"]["bytes_floor_s"] > 0
    assert rows["beam_step", "images=1 L=64"]["subject"] == "eager"
    engine = rows["engine", "32x64 max_len=4 batch=1"]
    assert engine["checks"]["identical"] and set(engine["speedups"]) == {"reference"}
    assert report["environment"]["device"] == "cpu" and report["command"].startswith("pytest benchmarks/")
    assert "fastcomer benchmarks" in done.stdout and "| images=1 L=64 (eager) |" in done.stdout
    # pytest-benchmark timed every variant that ran, with the suite's synchronising clock
    timed = json.loads(pytest_json.read_text())["benchmarks"]
    step_stats = next(b for b in timed if b["extra_info"]["fastcomer"].get("name") == step[1])
    assert step_stats["options"]["timer"] == "synchronized_clock" and step_stats["stats"]["median"] == rows[step]["medians_s"]["torch"]
    assert len(timed) == 4  # two steps on torch, one eager beam step, one engine case


def test_evaluate_benchmark_smoke(tmp_path):
    # fastcomer evaluate against the stand-in of CoMER's test loop: one row, identical answers
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_evaluate.py", "--smoke", "--bench-out",
                           str(out), "-q", "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = load_report(out)["rows"]
    assert (row["benchmark"], row["name"]) == ("evaluate", "6 images max_len=8")
    assert row["checks"] == {"identical": True} and set(row["medians_s"]) == {"fastcomer", "reference_loop"}
