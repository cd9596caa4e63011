"""`fastcomer evaluate`: the table on stdout, the three files, exit statuses, usage errors."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

pytest.importorskip("PIL.Image")

from fastcomer import evaluate  # noqa: E402
from fastcomer.cli import main  # noqa: E402

from support.comer_data import SPLIT_2014, SPLIT_2016, write_zip  # noqa: E402
from support.paths import REPO  # noqa: E402


@pytest.fixture()
def checkpoint(golden_model, tmp_path):
    path = tmp_path / "comer.ckpt"
    torch.save({"state_dict": {"comer_model." + k: v for k, v in golden_model.state_dict().items()},
                "hyper_parameters": {"beam_size": 2, "max_len": 6}}, path)  # the rest inferred from shapes
    return path


def test_table_and_files(golden_model, checkpoint, tmp_path, capsys):
    data = write_zip(tmp_path / "data.zip", {"2014": SPLIT_2014, "2016": SPLIT_2016})
    out = tmp_path / "out"
    status = main(["evaluate", str(data), "--checkpoint", str(checkpoint), "--split", "2016", "--out", str(out)])
    printed, err = capsys.readouterr()
    assert status == 0 and not err
    expected = evaluate(golden_model, data, "2016", beam_size=2, max_len=6)
    metrics = expected.metrics["2016"]
    row = next(line for line in printed.splitlines() if line.startswith("| 2016 |"))
    assert row.split(" | ")[1:4] == [str(metrics["images"]), str(metrics["count"]), f"{100 * metrics['exprate']:.2f}"]
    assert [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()] == expected.records
    assert json.loads((out / "metrics.json").read_text())["splits"] == expected.metrics
    with zipfile.ZipFile(out / "result.zip") as archive:
        assert sorted(archive.namelist()) == ["g.txt", "h.txt"]
    assert main(["evaluate", str(data), "--checkpoint", str(checkpoint), "--split", "2016", "--out", str(out),
                 "--resume"]) == 0
    with pytest.raises(SystemExit) as exited:  # a finished run is not overwritten
        main(["evaluate", str(data), "--checkpoint", str(checkpoint), "--split", "2016", "--out", str(out)])
    assert exited.value.code == 2 and "--resume" in capsys.readouterr().err


def test_failed_image_exit_status_and_caption_error(checkpoint, tmp_path, capsys):
    rows = SPLIT_2016 + [("lost", 20, 40, "x")]
    data = write_zip(tmp_path / "data.zip", {"2014": SPLIT_2016},
                     extra=[("data/2014/caption.txt", "".join(f"{n} {c}\n" for n, *_, c in rows))])
    assert main(["evaluate", str(data), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "a")]) == 1
    printed, err = capsys.readouterr()
    assert "2014/lost: missing image" in err and "missing image 1" in printed
    bad = write_zip(tmp_path / "bad.zip", {"2014": SPLIT_2016}, extra=[("data/2014/caption.txt", "g x\ng y\n")])
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", str(bad), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b")])
    assert exited.value.code == 2 and "already captioned" in capsys.readouterr().err


def test_torchrun_two_processes_write_what_one_writes(checkpoint, tmp_path, capsys):
    """`torchrun --nproc_per_node 2` on the CPU (gloo): each process decodes half of the batches,
    process 0 writes the same files as a single process."""
    data = write_zip(tmp_path / "data.zip", {"2014": SPLIT_2014, "2016": SPLIT_2016})
    arguments = ["evaluate", str(data), "--checkpoint", str(checkpoint), "--no-progress"]
    assert main([*arguments, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fastcomer", *arguments, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| 2014 |") == 1  # one table, from process 0
    for name in ("predictions.jsonl", "metrics.json", "2014/result.zip", "2016/result.zip"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_compare_lists_the_changed_answers(checkpoint, tmp_path, capsys):
    data = write_zip(tmp_path / "data.zip", {"2016": SPLIT_2016})
    assert main(["evaluate", str(data), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "a")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    rows[1]["latex"] = "x"
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["evaluate", str(data), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"),
                 "--compare", str(other)]) == 0
    printed = capsys.readouterr().out
    assert f"1 answer(s) differ from {other}" in printed
    assert f"2016/h: x -> {json.loads((tmp_path / 'b' / 'predictions.jsonl').read_text().splitlines()[1])['latex']}" in printed
