"""The benchmark commands: bench writes the shared schema, compare prints ratios row by row,
table regenerates the tables of markdown files, plot draws the figures from result files."""
import json
import shutil

import pytest
import torch

from fastcomer.benchmarking import load_report, make_row, new_report, write_report
from fastcomer.cli import COMMANDS, main
from fastcomer.cli.plot import engine_points, kernel_times
from support.paths import REPO

RESULTS = REPO / "benchmarks" / "results"
QUIET = [RESULTS / name for name in ("cpu-2threads-128x512-final.json", "cpu-2threads-128x512-maxlen60-quick.json",
                                     "cpu-2threads-256x1024-maxlen60-final.json")]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def kernel_report(tmp_path, name="kernels.json", triton_s=2e-5):
    report = new_report(torch.device("cpu"), "test")
    report["rows"] += [make_row("cross_attention_step", f"images={i} L=256", {"images": i}, "triton", {"triton": i * triton_s, "torch": i * 1e-4})
                       for i in (1, 8)]
    return write_report(report, tmp_path / name)


def test_every_command_is_registered():
    assert {command.__name__.rsplit(".", 1)[1] for command in COMMANDS} >= {"bench", "env", "compare", "table", "plot"}


def test_bench_writes_the_schema(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--shape", "32x64", "--max-len", "4", "--beam-size", "2", "--out", str(out)]) == 0
    report = load_report(out)
    (row,) = report["rows"]
    assert row["benchmark"] == "engine" and row["name"] == "32x64 max_len=4 batch=1" and row["checks"]["identical"]
    assert row["params"]["shape"] == [32, 64] and row["params"]["beam_size"] == 2 and row["params"]["max_len"] == 4
    assert set(row["medians_s"]) == {"engine", "reference"} and row["details"]["decoded_length"] <= 4
    details = row["details"]  # the encoder's time and floor apart from the decoder's
    assert 0 < details["encoder_s_per_image"] < row["medians_s"]["engine"]
    assert details["encoder_floor_ratio"] > 0 and details["decoder_floor_ratio"] > 0
    assert report["command"].startswith("fastcomer bench --shape 32x64") and report["environment"]["threads"] == torch.get_num_threads()
    assert "| 32x64 | 4 | 1 |" in capsys.readouterr().out


def test_compare_prints_ratios_row_by_row(tmp_path, capsys):
    before, after = kernel_report(tmp_path, "a.json"), kernel_report(tmp_path, "b.json", triton_s=1e-5)
    assert main(["compare", str(before), str(after)]) == 0
    out = capsys.readouterr().out
    assert "| cross_attention_step | images=8 L=256 | triton | 160 us | 80 us | 2.00x |" in out
    assert "| cross_attention_step | images=1 L=256 | torch | 100 us | 100 us | 1.00x |" in out


def test_compare_rejects_a_file_off_the_schema(tmp_path, capsys):
    bad = tmp_path / "old.json"
    bad.write_text(json.dumps({"date": "2026-11-22", "results": []}))
    with pytest.raises(SystemExit) as exited:  # a usage error, before any work
        main(["compare", str(bad), str(QUIET[0])])
    assert exited.value.code == 2 and "old.json: report lacks schema" in capsys.readouterr().err


def test_table_regenerates_readme_blocks(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    shutil.copy(QUIET[0], tmp_path / "r" / QUIET[0].name)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n<!-- results-table: r/{QUIET[0].name} -->\nold\n<!-- end results-table -->\n")
    assert main(["table", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text
    assert ("| 128x512 | 200 | 1 | 263.49 | 2.57 | 102.4x | not measured | not measured | not recorded | not measured "
            "| not measured | identical |") in text
    main(["table", str(QUIET[0])])
    assert "102.4x" in capsys.readouterr().out


def test_table_regenerates_several_files(tmp_path):
    (tmp_path / "docs").mkdir()
    shutil.copy(QUIET[0], tmp_path / QUIET[0].name)
    readme, page = tmp_path / "README.md", tmp_path / "docs" / "page.md"
    readme.write_text(f"<!-- results-table: {QUIET[0].name} -->\nold\n<!-- end results-table -->\n")
    page.write_text(f"<!-- results-table: ../{QUIET[0].name} -->\nold\n<!-- end results-table -->\n")
    assert main(["table", "--readme", str(readme), str(page)]) == 0
    assert readme.read_text() == page.read_text().replace(f"../{QUIET[0].name}", QUIET[0].name)
    assert "old" not in readme.read_text() and "102.4x" in readme.read_text()


def test_plot_points_from_the_committed_results():
    reports = [load_report(path) for path in QUIET]
    by_length = engine_points(reports, "decoded_length")
    assert [(x, round(y, 1)) for x, y in by_length["128x512, AMD EPYC, 2 threads"]] == [(59, 11.5), (199, 102.4)]
    by_size = engine_points(reports, "pixels")
    assert [(x, round(y, 1)) for x, y in by_size["max_len 60, AMD EPYC, 2 threads"]] == [(128 * 512, 11.5), (256 * 1024, 18.7)]


def test_plot_draws_every_figure(tmp_path):
    out = tmp_path / "plots"
    kernels = kernel_report(tmp_path)
    cases, variants = kernel_times([load_report(kernels)])["cross_attention_step"]
    assert cases == ["images=1 L=256", "images=8 L=256"] and set(variants) == {"triton (subject)", "torch"}
    assert main(["plot", *map(str, QUIET), str(kernels), "--out", str(out)]) == 0
    names = sorted(path.name for path in out.iterdir())
    assert names == ["cross_attention_step_time.png", "engine_speedup_vs_image_size.png", "engine_speedup_vs_length.png"]
    assert all((out / name).read_bytes().startswith(PNG_MAGIC) for name in names)


def test_readme_embeds_the_committed_plots():
    readme = (REPO / "README.md").read_text()
    for name in ("engine_speedup_vs_length.png", "engine_speedup_vs_image_size.png"):
        assert f"](benchmarks/results/plots/{name})" in readme
        assert (RESULTS / "plots" / name).read_bytes().startswith(PNG_MAGIC)


def test_plot_without_rows_fails(tmp_path):
    empty = write_report(new_report(torch.device("cpu"), "test"), tmp_path / "empty.json")
    with pytest.raises(SystemExit, match="no rows"):
        main(["plot", str(empty), "--out", str(tmp_path / "plots")])
