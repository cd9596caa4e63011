"""The result schema, the committed result files, the tables generated from them (those of the
README and docs/benchmarks.md included) and the comparison of two reports."""
import copy
import json
import re

import pytest
import torch

from fastcomer.benchmarking import (
    SCHEMA,
    check_report,
    compare_reports,
    load_report,
    make_row,
    measure,
    rows_from_measurements,
    synchronized_clock,
    new_report,
    render_table,
    unmatched_rows,
    update_readme_tables,
    write_report,
)
from support.paths import REPO

RESULTS = sorted((REPO / "benchmarks" / "results").glob("*.json"))


def small_report():
    report = new_report(torch.device("cpu"), "test")
    report["rows"] += [
        make_row("cross_attention_step", "images=1 L=64", {"images": 1}, "triton", {"triton": 2e-5, "torch": 1e-4}),
        make_row("beam_step", "images=1 L=256", {"images": 1}, "eager", {"eager": 3e-3}),
    ]
    return report


def test_make_row_speedups_are_baseline_over_subject():
    row = make_row("cross_attention_step", "x", {}, "cuda", {"cuda": 1e-5, "triton": 2e-5, "torch": 8e-5})
    assert row["speedups"] == pytest.approx({"triton": 2.0, "torch": 8.0})
    assert row["floor"] is None
    with pytest.raises(ValueError, match="subject"):
        make_row("cross_attention_step", "x", {}, "cuda", {"torch": 1.0})


def test_new_report_records_the_environment():
    report = check_report(small_report())
    env = report["environment"]
    assert report["schema"] == SCHEMA and env["device"] == "cpu" and env["gpu"] is None
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["fastcomer"] and env["python"] and len(env["load_average"]) == 3


@pytest.mark.parametrize("fault, message", [
    (lambda r: r.pop("environment"), "lacks environment"),
    (lambda r: r.update(schema="other/1"), "schema"),
    (lambda r: r["environment"].pop("threads"), "environment lacks threads"),
    (lambda r: r["rows"].append(copy.deepcopy(r["rows"][0])), "second row"),
    (lambda r: r["rows"][0]["medians_s"].update(torch=0.0), "positive"),
    (lambda r: r["rows"][0]["speedups"].pop("torch"), "speedups"),
    (lambda r: r["rows"][0].update(floor={"ratio": 2.0}), "floor lacks"),
])
def test_check_report_names_the_fault(fault, message):
    report = small_report()
    fault(report)
    with pytest.raises(ValueError, match=message):
        check_report(report)


def test_a_filled_floor_is_accepted():
    report = small_report()
    report["rows"][0]["floor"] = {"flops_per_image": 1e9, "rates_flop_s": {"matmul": 1e12}, "ratio": 3.0}
    check_report(report)


def test_write_report_into_a_directory_and_back(tmp_path):
    report = small_report()
    path = write_report(report, tmp_path)
    assert path.parent == tmp_path and path.name.startswith("bench-")
    assert load_report(path) == report
    path.write_text(json.dumps({**report, "rows": "none"}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: report.rows must be a list")):
        load_report(path)


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_committed_results_follow_the_schema(path):
    report = load_report(path)
    for row in report["rows"]:
        # a recorded run passed its own checks: each a property that held, or a count of faults that is 0
        assert row["checks"] and all(v is True or (type(v) is int and v == 0) for v in row["checks"].values())
        subject = row["medians_s"][row["subject"]]
        for baseline, speedup in row["speedups"].items():
            assert speedup == pytest.approx(row["medians_s"][baseline] / subject)
    if report["provenance"] is not None:  # a converted file: the same numbers as the original fields say
        original = report["provenance"]["original"]
        assert report["date"] == original["date"] and report["environment"]["torch"] == original["torch"]


def test_converted_result_keeps_its_numbers():
    report = load_report(REPO / "benchmarks" / "results" / "cpu-2threads-128x512-final.json")
    (row,) = report["rows"]
    assert row["name"] == "128x512 max_len=200 batch=1"
    assert row["medians_s"] == {"engine": 2.573502252000253, "reference": 263.4925340710006}
    assert row["speedups"]["reference"] == pytest.approx(102.3867509213179)
    assert report["environment"]["load_average"][0] == pytest.approx(3.13623046875)


# The markdown files that hold generated result tables (each table in one of them).
GENERATED_TABLES = ("README.md", "docs/benchmarks.md")


@pytest.mark.parametrize("name", GENERATED_TABLES)
def test_tables_are_generated_from_the_committed_results(name):
    path = REPO / name
    text = path.read_text()
    assert "<!-- results-table: " in text
    assert update_readme_tables(text, path.parent) == text, \
        f"regenerate with: python -m fastcomer table --readme {' '.join(GENERATED_TABLES)}"


def test_readme_table_regeneration_replaces_a_stale_table():
    name = RESULTS[0].relative_to(REPO)
    stale = f"intro\n<!-- results-table: {name} -->\n| typed by hand |\n<!-- end results-table -->\nrest\n"
    fresh = update_readme_tables(stale, REPO)
    assert "typed by hand" not in fresh and fresh.startswith("intro\n") and fresh.endswith("<!-- end results-table -->\nrest\n")
    assert render_table([(RESULTS[0].name, load_report(RESULTS[0]))]) in fresh
    assert update_readme_tables(fresh, REPO) == fresh


def test_render_table_one_table_per_benchmark():
    table = render_table([("a.json", small_report())])
    decode, beam = table.split("\n\n")
    assert decode.splitlines()[0].startswith("| cross_attention_step | triton | torch | speed-up vs torch |")
    assert "| images=1 L=64 (triton) | 20 us | 100 us | 5.00x |" in decode
    assert beam.splitlines()[2].startswith("| images=1 L=256 (eager) | 3 ms |")


def test_engine_table_shows_floor_ratio_and_workers_throughput():
    report = load_report(RESULTS[0])
    row = copy.deepcopy(report["rows"][0])
    row["floor"] = {"flops_per_image": 4e10, "rates_flop_s": {"conv": 9e10, "matmul": 8e10}, "ratio": 2.345}
    row["details"].update(workers=2, workers_throughput=1.789, encoder_floor_ratio=1.456, engine_threads=1,
                          engine_s_by_threads={"1": 0.5512, "2": 0.3987})
    report["rows"] = [row]
    table = render_table([("f.json", check_report(report))])
    assert table.splitlines()[0].split(" | ")[6:11] == ["engine / FLOP floor", "encoder / its floor", "engine threads",
                                                        "1 / 2 threads s/image", "workers: throughput"]
    assert f"| {row['speedups']['reference']:.1f}x | 2.35x | 1.46x | 1 | 0.55 / 0.40 | 2: 1.79x | identical |" in table
    old = render_table([("f.json", load_report(REPO / "benchmarks/results/cpu-2threads-128x512-final.json"))])  # before these fields
    assert "| not measured | not recorded | not measured |" in old


def test_compare_reports_row_by_row():
    before, after = small_report(), small_report()
    after["rows"][0]["medians_s"]["triton"] = 1e-5
    after["rows"].append(make_row("engine", "only after", {}, "engine", {"engine": 1.0}))
    entries = {(e["benchmark"], e["variant"]): e["ratio"] for e in compare_reports(before, after)}
    assert entries == pytest.approx({("cross_attention_step", "triton"): 2.0, ("cross_attention_step", "torch"): 1.0,
                                     ("beam_step", "eager"): 1.0})
    assert unmatched_rows(before, after) == ([], ["engine only after"])


def test_measure_times_blocks():
    assert measure(lambda: sum(range(100)), min_run_time=0.01) > 0
    assert synchronized_clock() <= synchronized_clock()


def measured(name, variant, median, **extra):
    entry = dict(benchmark="cross_attention_step", name=name, variant=variant, subjects=["cuda", "triton", "torch"],
                 params={"L": 64}, checks={}, details={})
    return {**entry, **extra}, median


def test_rows_from_measurements_one_row_per_case():
    rows = rows_from_measurements([
        measured("a", "torch", 4e-5, details={"bytes": 10, "tflops": {"torch": 1.0}}),
        measured("b", "torch", 1e-4),
        measured("a", "triton", 1e-5, details={"bytes": 10, "tflops": {"triton": 4.0}}, checks={"err": {"triton": 0.0}}),
        ({"rows": [make_row("engine", "32x64", {}, "engine", {"engine": 1.0, "reference": 3.0})]}, 9.0),
    ])
    assert [(row["benchmark"], row["name"]) for row in rows] == [("cross_attention_step", "a"), ("cross_attention_step", "b"),
                                                                 ("engine", "32x64")]
    first = rows[0]
    assert first["subject"] == "triton" and first["medians_s"] == {"torch": 4e-5, "triton": 1e-5}  # the first subject measured
    assert first["speedups"] == pytest.approx({"torch": 4.0}) and first["params"] == {"L": 64}
    assert first["details"] == {"bytes": 10, "tflops": {"torch": 1.0, "triton": 4.0}} and first["checks"] == {"err": {"triton": 0.0}}
    assert rows[1]["subject"] == "torch" and rows[2]["speedups"] == {"reference": 3.0}
    with pytest.raises(ValueError, match="none of the subjects"):
        rows_from_measurements([measured("c", "other", 1.0)])


def test_old_and_pytest_benchmark_files_load(tmp_path):
    report = small_report()
    report["rows"][0]["benchmark"] = "decode_step"  # the cross-attention step's name in files written before
    old = write_report(report, tmp_path / "old.json")
    assert load_report(old)["rows"][0]["benchmark"] == "cross_attention_step"
    wrapped = tmp_path / "pytest-benchmark.json"
    wrapped.write_text(json.dumps({"machine_info": {}, "benchmarks": [], "fastcomer": small_report()}))
    assert load_report(wrapped)["rows"] == small_report()["rows"]
    wrapped.write_text(json.dumps({"machine_info": {}, "benchmarks": []}))
    with pytest.raises(ValueError, match="without the suite's report"):
        load_report(wrapped)
