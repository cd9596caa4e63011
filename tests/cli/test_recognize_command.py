"""`fastcomer recognize`: one line per image (or JSON), folders, exit status, progress bar, usage errors."""
import json

import pytest
import torch

PIL = pytest.importorskip("PIL.Image")

from fastcomer import recognize  # noqa: E402
from fastcomer.cli import main  # noqa: E402

from support.images import strokes  # noqa: E402
from support.random_models import random_model  # noqa: E402

SEARCH = dict(beam_size=2, max_len=6)


@pytest.fixture(scope="module")
def model():
    return random_model(6, torch.float32).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt") / "comer.ckpt"
    coverage = {"cross_coverage": model.config.cross_coverage, "self_coverage": model.config.self_coverage}
    torch.save({"state_dict": {"comer_model." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": coverage}, path)  # partial: the rest is inferred from shapes
    return path


def image_files(folder, count):
    paths = []
    for i in range(count):
        paths.append(folder / f"img{i}.png")
        PIL.fromarray(strokes(20, 40 + 8 * i, i)).save(paths[-1])
    return paths


def run_cli(argv, capsys):
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_one_line_per_image(model, checkpoint, tmp_path, capsys):
    paths = image_files(tmp_path, 3)
    status, out, err = run_cli(["recognize", *map(str, paths), "--checkpoint", str(checkpoint), "--beam-size", "2",
                                "--max-len", "6"], capsys)
    assert status == 0 and not err
    expected = recognize(model, paths, **SEARCH)
    assert out.splitlines() == [f"{p}\t{latex}" for p, latex in zip(paths, expected)]
    status, out, _ = run_cli(["recognize", str(tmp_path), "--checkpoint", str(checkpoint), "--beam-size", "2",
                              "--max-len", "6", "--json"], capsys)  # a folder: its image files
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["path"], r["latex"], r["error"]) for r in rows] == [(str(p), latex, None) for p, latex in zip(paths, expected)]


def test_cli_failed_image_exit_status(checkpoint, tmp_path, capsys):
    (good,) = image_files(tmp_path, 1)
    status, out, err = run_cli(["recognize", str(good), str(tmp_path / "absent.png"), "--checkpoint", str(checkpoint),
                                "--beam-size", "2", "--max-len", "6"], capsys)
    assert status == 1
    assert out.startswith(f"{good}\t") and len(out.splitlines()) == 1
    assert "absent.png" in err and "Traceback" not in err


def test_cli_progress_bar(checkpoint, tmp_path, capsys, monkeypatch):
    paths = image_files(tmp_path, 3)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    status, _, err = run_cli(["recognize", *map(str, paths), "--checkpoint", str(checkpoint), "--beam-size", "2",
                              "--max-len", "6", "--batch-size", "1"], capsys)
    assert status == 0 and "3/3 images" in err


@pytest.mark.parametrize("args", [["--beam-size", "0"], ["--batch-size", "-1"], ["--max-len", "1"], ["--device", "gpu"],
                                  ["--checkpoint", "absent.ckpt"], ["--max-len", "x"]])
def test_cli_usage_errors(checkpoint, tmp_path, capsys, args):
    (image,) = image_files(tmp_path, 1)
    with pytest.raises(SystemExit) as exit_:
        main(["recognize", str(image), "--checkpoint", str(checkpoint), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
