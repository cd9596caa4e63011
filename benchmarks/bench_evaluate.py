"""`fastcomer evaluate` against CoMER's test loop, on the same data set in CoMER's layout (written by this
script: formula-like images of CROHME-like sizes, random captions) and the same weights (the published
configuration, seeded random), with identical answers required. The baseline is, with
`--public-code DIR --public-python PY`, the public code's own `Trainer.test` loop, unpatched
(`public_test_loop.py`, run by PY: a Python with the public code's dependencies, pytorch-lightning 1.4
and torchvision; result.zip compared file by file); without them, a stand-in that runs here with
fastcomer's dependencies only: CoMER's batches and preprocessing decoded by
`fastcomer.reference_beam_search` (the public code's search as its code computes it) one batch after
another in one process with torch's default threads. One row in `fastcomer.benchmarking`'s schema:
seconds for the whole data set.

    python benchmarks/bench_evaluate.py --out benchmarks/results/evaluate-cpu.json   # quiet machine: long
    python benchmarks/bench_evaluate.py --images 40 --max-len 60 --public-code CoMER --public-python venv/bin/python
    python benchmarks/bench_evaluate.py --smoke                                     # check: seconds
    python -m pytest benchmarks/bench_evaluate.py --smoke                            # the same, in the suite
"""
import argparse
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import torch

from fastcomer import CoMER, evaluate, load_comer, prepare_image, reference_beam_search
from fastcomer.benchmarking import bench_model, make_row, new_report, render_table, scale_weights, timed, write_report
from fastcomer.evaluation.batching import plan_batches
from fastcomer.search.images import pad_images
from fastcomer.vocab import vocab


def write_data(path: Path, images: int, seed: int) -> Path:
    """A data.zip of one split '2014': stroke images of 40..160 x 100..600 pixels, 3..30-token captions."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    symbols = vocab.idx2word[3:]
    lines = []
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(images):
            height, width = rng.randint(40, 160), rng.randint(100, 600)
            pixels = np.zeros((height, width), np.uint8)
            for _ in range(rng.randint(3, 12)):
                r, c = rng.randrange(height), rng.randrange(width)
                pixels[r : r + rng.randint(2, 6), c : c + rng.randint(8, 40)] = 255
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="BMP")
            archive.writestr(f"data/2014/img/img{i}.bmp", buffer.getvalue())
            lines.append(f"img{i} " + " ".join(rng.choice(symbols) for _ in range(rng.randint(3, 30))))
        archive.writestr("data/2014/caption.txt", "\n".join(lines) + "\n")
    return path


def reference_loop(model: CoMER, data: Path, search: dict) -> List[str]:
    """CoMER's test loop over data.zip's split 2014: its batches, one after another, the reference search."""
    from fastcomer.evaluation.data import open_dataset, read_pixels

    dataset = open_dataset(data)
    samples = dataset.samples("2014")
    pictures = [read_pixels(dataset.read(s)) for s in samples]
    batches, _ = plan_batches([p.size[0] * p.size[1] for p in pictures], [len(s.tokens) for s in samples])
    answers = {}
    for batch in batches:
        img, mask = pad_images([prepare_image(pictures[i], invert=False) for i in batch])
        for i, hyp in zip(batch, reference_beam_search(model, img, mask, **search)):
            answers[samples[i].name] = vocab.indices2label(hyp.seq)
    dataset.close()
    return [answers[s.name] for s in samples]


def public_loop(model: CoMER, data: Path, search: dict, code: Path, python: str, folder: Path):
    """The public code's test loop over data.zip's split 2014 with the model's weights: its result.zip's
    files, its timing line, and the checkpoint it saved."""
    weights, out = folder / "weights.pt", folder / "public"
    torch.save(model.state_dict(), weights)
    config = asdict(model.config)
    del config["vocab_size"]  # the public code's vocabulary is fixed (the same 113 tokens)
    command = [python, str(Path(__file__).with_name("public_test_loop.py")), str(code), str(weights), str(data),
               str(out), json.dumps({**config, **search})]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode:
        raise RuntimeError(f"the public test loop failed:\n{finished.stderr[-3000:]}")
    return zip_files(out / "result.zip"), json.loads(finished.stdout.strip().splitlines()[-1]), out / "public.ckpt"


def zip_files(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def run(smoke: bool, images: Optional[int] = None, max_len: Optional[int] = None,
        public_code: Optional[Path] = None, public_python: Optional[str] = None) -> dict:
    if smoke:
        torch.manual_seed(0)
        model = scale_weights(CoMER(d_model=32, growth_rate=4, num_layers=1, nhead=4, num_decoder_layers=2,
                                    dim_feedforward=64, dc=8), 0, end_bias=1.0, end_scale=4.0)
    else:
        model = bench_model()
    images = images or (6 if smoke else 200)
    search = {"beam_size": 10, "max_len": max_len or (8 if smoke else 200), "alpha": 1.0}
    details = {"model": "small random CoMER" if smoke else "CoMER() published config, seeded random weights",
               "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as folder:
        data = write_data(Path(folder) / "data.zip", images, seed=0)
        if public_code is None:
            baseline = "reference_loop"
            reference, baseline_s = timed(lambda: reference_loop(model, data, search))
            result, engine_s = timed(lambda: evaluate(model, data, "2014", **search))
            identical = [r["latex"] for r in result.records] == reference
        else:
            baseline = "public_test_loop"
            public, timing, checkpoint = public_loop(model, data, search, public_code, public_python, Path(folder))
            baseline_s = timing["seconds"]
            details["public_code"] = {"torch": timing["torch"], "threads": timing["threads"]}
            loaded = load_comer(checkpoint)  # the weights as the public code saved them
            out = Path(folder) / "fastcomer"
            _, engine_s = timed(lambda: evaluate(loaded, data, "2014", out, **search))
            identical = zip_files(out / "result.zip") == public
    return make_row("evaluate", f"{images} images max_len={search['max_len']}", {"images": images, **search},
                    "fastcomer", {"fastcomer": engine_s, baseline: baseline_s},
                    checks={"identical": identical}, details=details)


def test_evaluate(smoke, benchmark, record):
    """The suite's entry (`python -m pytest benchmarks/bench_evaluate.py [--smoke]`, the stand-in
    baseline): the whole comparison is one pytest-benchmark round; its row is timed by `run`."""
    row = benchmark.pedantic(run, args=(smoke,), rounds=1)
    record.rows([row])
    assert row["checks"]["identical"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and data set: checks that the benchmark runs")
    parser.add_argument("--images", type=int, help="images in the data set (default: 200, smoke 6)")
    parser.add_argument("--max-len", type=int, help="search max_len (default: 200, smoke 8)")
    parser.add_argument("--public-code", type=Path, help="the public CoMER code's folder: time its own test loop")
    parser.add_argument("--public-python", help="the Python that runs the public code (with its dependencies)")
    parser.add_argument("--out", type=Path, help="write the report (JSON) to this file or into this folder")
    args = parser.parse_args(argv)
    if (args.public_code is None) != (args.public_python is None):
        parser.error("--public-code and --public-python go together")
    if args.public_code is not None and not (args.public_code / "comer" / "lit_comer.py").is_file():
        parser.error(f"--public-code: {str(args.public_code)!r} holds no comer/lit_comer.py (the public CoMER code)")
    if args.public_python is not None and shutil.which(args.public_python) is None:
        parser.error(f"--public-python: no such program {args.public_python!r}")
    report = new_report(torch.device("cpu"))
    report["rows"] = [run(args.smoke, args.images, args.max_len, args.public_code, args.public_python)]
    path = write_report(report, args.out)
    print(render_table([(str(path or "not written"), report)]))
    return 0 if report["rows"][0]["checks"]["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
