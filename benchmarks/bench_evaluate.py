"""`fastcomer evaluate` against CoMER's test loop as it can run here: the same data set in CoMER's
layout (written by this script: formula-like images of CROHME-like sizes, random captions), the same
batches (CoMER's), the same preprocessing, decoded by `fastcomer.reference_beam_search` (the public
code's search, computed as its code computes it) one batch after another in one process with torch's
default threads, as `LitCoMER.test_step` runs; against `fastcomer.evaluate` (the engine, batches over
worker processes). The public code itself does not run on this project's machine (pytorch-lightning
1.4 on torch 1.8, OpenCV), so this is the closest measurable stand-in. Both must give identical
answers. One row in `fastcomer.benchmarking`'s schema: seconds for the whole data set.

    python benchmarks/bench_evaluate.py --out benchmarks/results/evaluate-cpu.json   # quiet machine: long
    python benchmarks/bench_evaluate.py --smoke                                     # check: seconds
    python -m pytest benchmarks/bench_evaluate.py --smoke                            # the same, in the suite
"""
import argparse
import io
import random
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional

import torch

from fastcomer import CoMER, evaluate, prepare_image, reference_beam_search
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


def run(smoke: bool, images: Optional[int] = None, max_len: Optional[int] = None) -> dict:
    if smoke:
        torch.manual_seed(0)
        model = scale_weights(CoMER(d_model=32, growth_rate=4, num_layers=1, nhead=4, num_decoder_layers=2,
                                    dim_feedforward=64, dc=8), 0, end_bias=1.0, end_scale=4.0)
    else:
        model = bench_model()
    images = images or (6 if smoke else 200)
    search = {"beam_size": 10, "max_len": max_len or (8 if smoke else 200), "alpha": 1.0}
    with tempfile.TemporaryDirectory() as folder:
        data = write_data(Path(folder) / "data.zip", images, seed=0)
        reference, reference_s = timed(lambda: reference_loop(model, data, search))
        result, engine_s = timed(lambda: evaluate(model, data, "2014", **search))
    answers = [r["latex"] for r in result.records]
    return make_row("evaluate", f"{images} images max_len={search['max_len']}", {"images": images, **search},
                    "fastcomer", {"fastcomer": engine_s, "reference_loop": reference_s},
                    checks={"identical": answers == reference},
                    details={"model": "small random CoMER" if smoke else "CoMER() published config, seeded random weights",
                             "torch_threads": torch.get_num_threads()})


def test_evaluate(smoke, add_row):
    """The suite's entry (`python -m pytest benchmarks/bench_evaluate.py [--smoke]`)."""
    row = run(smoke)
    add_row(row)
    assert row["checks"]["identical"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and data set: checks that the benchmark runs")
    parser.add_argument("--images", type=int, help="images in the data set (default: 200, smoke 6)")
    parser.add_argument("--max-len", type=int, help="search max_len (default: 200, smoke 8)")
    parser.add_argument("--out", type=Path, help="write the report (JSON) to this file or into this folder")
    args = parser.parse_args(argv)
    report = new_report(torch.device("cpu"))
    report["rows"] = [run(args.smoke, args.images, args.max_len)]
    path = write_report(report, args.out)
    print(render_table([(str(path or "not written"), report)]))
    return 0 if report["rows"][0]["checks"]["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
