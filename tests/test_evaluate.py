"""fastcomer.evaluate on data sets in CoMER's layout that the tests write: CoMER's test batches
(against the reference search over batches built here), metrics against an independent count,
result.zip's format, failures reported and counted, resume after an interruption."""
import json
import zipfile
from functools import lru_cache

import pytest
import torch

PIL = pytest.importorskip("PIL.Image")

from fastcomer import CaptionError, evaluate, prepare_image, reference_beam_search  # noqa: E402
from fastcomer.evaluation import run as evaluation_run  # noqa: E402
from fastcomer.evaluation.batching import plan_batches  # noqa: E402
from fastcomer.search.images import pad_images  # noqa: E402
from fastcomer.vocab import vocab  # noqa: E402

from support.comer_data import SPLIT_2014, SPLIT_2016, bmp, write_zip  # noqa: E402
from support.images import strokes  # noqa: E402
from support.public_comer import lit_comer_holding  # noqa: E402
from support.markers import requires_gpu  # noqa: E402

SEARCH = dict(beam_size=3, max_len=8)


@pytest.fixture()
def data_zip(tmp_path):
    return write_zip(tmp_path / "data.zip", {"2014": SPLIT_2014, "2016": SPLIT_2016})


def distance(a, b):
    """Token edit distance, recursively (independent of fastcomer's table)."""
    @lru_cache(None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def test_comer_batches_give_the_reference_search_of_comer_batches(golden_model, data_zip):
    result = evaluate(golden_model, data_zip, "2014", **SEARCH)
    # CoMER's test loop here: by area (ties in caption order), 4 per batch (all far below 32e4 pixels)
    order = sorted(range(len(SPLIT_2014)), key=lambda i: SPLIT_2014[i][1] * SPLIT_2014[i][2])
    expected = {}
    for start in range(0, len(order), 4):
        batch = order[start : start + 4]
        images = [prepare_image(strokes(SPLIT_2014[i][1], SPLIT_2014[i][2], i), invert=False).double() for i in batch]
        img, mask = pad_images(images)
        for i, hyp in zip(batch, reference_beam_search(golden_model, img, mask, **SEARCH)):
            expected[SPLIT_2014[i][0]] = (vocab.indices2label(hyp.seq), pytest.approx(hyp.score, rel=1e-9, abs=0))
    # the scores tell the batches apart (an image's padding changes them), as the answers may not
    assert {r["name"]: (r["latex"], r["score"]) for r in result.records} == expected
    assert [r["name"] for r in result.records] == [row[0] for row in SPLIT_2014]  # caption order


def test_answers_equal_the_public_code_test_loop(golden_model, data_zip):
    # Where the public CoMER code is importable (with pytorch-lightning 1.4; CI has neither): its
    # datamodule's test batches decoded by LitCoMER's own search, unpatched, as test_step does.
    datamodule = pytest.importorskip("comer.datamodule")
    lit_comer = pytest.importorskip("comer.lit_comer")
    lit = lit_comer_holding(lit_comer.LitCoMER, golden_model, **SEARCH)
    crohme = datamodule.CROHMEDatamodule(zipfile_path=str(data_zip), test_year="2014", eval_batch_size=4,
                                         num_workers=0)
    crohme.setup(stage="test")
    public = {}
    with torch.no_grad():
        for batch in crohme.test_dataloader():
            for name, hyp in zip(batch.img_bases, lit.approximate_joint_search(batch.imgs.double(), batch.mask)):
                public[name] = (vocab.indices2label(hyp.seq), float(hyp.score))
    records = {r["name"]: (r["latex"], r["score"]) for r in evaluate(lit, data_zip, "2014", **SEARCH).records}
    assert {name: latex for name, (latex, _) in records.items()} == {name: latex for name, (latex, _) in public.items()}
    # the same scores, but where CoMER resizes the image (height < 16: image c), whose pixels are
    # within one grey level of cv2's fixed-point arithmetic (docs/evaluate.md), not always equal
    resized = {name for name, height, width, _ in SPLIT_2014 if height < 16}
    assert resized == {"c"}
    assert {n: s for n, (_, s) in records.items() if n not in resized} == \
        {n: pytest.approx(s, rel=1e-9, abs=0) for n, (_, s) in public.items() if n not in resized}


def test_metrics_equal_an_independent_count(golden_model, data_zip):
    result = evaluate(golden_model, data_zip, ["2014", "2016"], **SEARCH)
    for split, rows in (("2014", SPLIT_2014), ("2016", SPLIT_2016)):
        records = {r["name"]: r for r in result.records if r["split"] == split}
        distances = [distance(tuple(records[n]["latex"].split()), tuple(c.split())) for n, *_, c in rows]
        assert [records[n]["distance"] for n, *_ in rows] == distances
        metrics = result.metrics[split]
        assert metrics["count"] == metrics["images"] == len(rows)
        assert metrics["exprate"] == sum(d == 0 for d in distances) / len(rows)
        for k in (1, 2, 3):
            assert metrics[f"within_{k}"] == sum(d <= k for d in distances) / len(rows)
        assert sum(b["count"] for b in metrics["by_caption_length"].values()) == len(rows)


def test_exact_matches_count(golden_model, tmp_path):
    """Captions set to the model's own answers: ExpRate 1; one token changed: within 1, not exact."""
    first = evaluate(golden_model, write_zip(tmp_path / "a.zip", {"2014": SPLIT_2014}), **SEARCH)
    answers = {r["name"]: r["latex"] for r in first.records}
    rows = [(n, h, w, answers[n]) for n, h, w, _ in SPLIT_2014]
    rows[0] = rows[0][:3] + (answers["a"] + " x",)
    second = evaluate(golden_model, write_zip(tmp_path / "b.zip", {"2014": rows}), **SEARCH)
    assert second.metrics["2014"]["exprate"] == 5 / 6 and second.metrics["2014"]["within_1"] == 1.0


def test_alone_decodes_each_image_on_its_own(golden_model, data_zip):
    result = evaluate(golden_model, data_zip, "2016", batching="alone", **SEARCH)
    for seed, (name, height, width, _) in enumerate(SPLIT_2016):
        image = prepare_image(strokes(height, width, seed), invert=False).double()[None]
        (hyp,) = reference_beam_search(golden_model, image, torch.zeros(image.shape[0], *image.shape[2:], dtype=torch.bool),
                                       **SEARCH)
        record = next(r for r in result.records if r["name"] == name)
        assert (record["latex"], record["score"]) == (vocab.indices2label(hyp.seq), pytest.approx(hyp.score, rel=1e-9, abs=0))


def test_plan_batches_follows_comer_rules():
    # areas ascending after sorting: 4 small fill a batch; then 100k-pixel images: 3 * 100k fits, 4 * 100k does not
    areas = [10, 10, 10, 10, 10, 100_000, 100_000, 100_000, 100_000, 400_000, 50]
    lengths = [5] * len(areas)
    lengths[4] = 201
    batches, left_out = plan_batches(areas, lengths)
    assert batches == [[0, 1, 2, 3], [10, 5, 6], [7, 8]]
    assert set(left_out) == {4, 9} and "201 tokens" in left_out[4] and "400000 pixels" in left_out[9]
    assert plan_batches(areas, lengths, "alone")[0] == [[0], [1], [2], [3], [10], [5], [6], [7], [8]]


def test_result_zip_and_files(golden_model, data_zip, tmp_path):
    out = tmp_path / "out"
    result = evaluate(golden_model, data_zip, "2014", out, **SEARCH)
    with zipfile.ZipFile(out / "result.zip") as archive:
        infos = archive.infolist()
        order = sorted(range(len(SPLIT_2014)), key=lambda i: SPLIT_2014[i][1] * SPLIT_2014[i][2])
        assert [i.filename for i in infos] == [f"{SPLIT_2014[i][0]}.txt" for i in order]  # decoding order
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        latex = {r["name"]: r["latex"] for r in result.records}
        for info in infos:
            name = info.filename[:-4]
            assert archive.read(info) == f"%{name}\n${latex[name]}$".encode()
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows == result.records and set(rows[0]) == {"name", "split", "latex", "truth", "distance", "score", "error"}
    assert json.loads((out / "metrics.json").read_text())["splits"] == result.metrics
    with pytest.raises(FileExistsError, match="resume"):
        evaluate(golden_model, data_zip, "2014", out, **SEARCH)


def test_failures_are_reported_and_counted(golden_model, tmp_path):
    rows = SPLIT_2016 + [("missing", 20, 40, "x"), ("broken", 20, 40, "x"), ("odd", 20, 40, "x \\unknowntoken")]
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data/2014/caption.txt", "".join(f"{n} {c}\n" for n, *_, c in rows))
        for seed, (name, height, width, _) in enumerate(rows):
            if name == "broken":
                archive.writestr("data/2014/img/broken.bmp", b"BM not an image")
            elif name != "missing":
                archive.writestr(f"data/2014/img/{name}.bmp", bmp(height, width, seed))
    result = evaluate(golden_model, path, **SEARCH)
    errors = {r["name"]: r["error"] for r in result.records}
    assert errors["missing"].startswith("missing image") and errors["broken"].startswith("unreadable image")
    assert errors["odd"] == "unknown tokens: \\unknowntoken"
    assert next(r for r in result.records if r["name"] == "odd")["latex"] is not None  # decoded, not scored
    metrics = result.metrics["2014"]
    assert metrics["images"] == 5 and metrics["count"] == 2
    assert metrics["not_scored"] == {"missing image": 1, "unreadable image": 1, "unknown tokens": 1}


@pytest.mark.parametrize("caption, message", [
    (b"a x\na y\n", "already captioned on line 1"), (b"a x\nb\n", "line 2: 'b' has no caption tokens"),
    (b"a \xff\n", "not UTF-8"), (b"\n\n", "no captions"),
])
def test_a_caption_file_that_does_not_parse_fails_before_decoding(golden_model, tmp_path, monkeypatch, caption, message):
    path = write_zip(tmp_path / "data.zip", {"2014": SPLIT_2016}, extra=[("data/2016/caption.txt", caption)])
    path2016 = tmp_path / "2016"
    monkeypatch.setattr(evaluation_run, "decode_batches", lambda *a, **k: pytest.fail("decoded before the check"))
    with pytest.raises(CaptionError, match=message):
        evaluate(golden_model, path, ["2014", "2016"], path2016, **SEARCH)
    assert not path2016.exists() or not (path2016 / "predictions.jsonl").exists()


def test_layouts_give_the_same_records(golden_model, data_zip, tmp_path):
    zipped = evaluate(golden_model, data_zip, "2016", **SEARCH).records
    with zipfile.ZipFile(data_zip) as archive:
        archive.extractall(tmp_path / "extracted")
    assert evaluate(golden_model, tmp_path / "extracted", "2016", **SEARCH).records == zipped
    assert evaluate(golden_model, tmp_path / "extracted" / "data", "2016", **SEARCH).records == zipped
    split_folder = tmp_path / "extracted" / "data" / "2016"
    (split_folder / "caption.txt").rename(tmp_path / "caption.txt")
    for image in (split_folder / "img").iterdir():  # images next to the caption file
        image.rename(tmp_path / image.name)
    flat = evaluate(golden_model, tmp_path, **SEARCH).records
    assert [{**r, "split": "2016"} for r in flat] == zipped


def test_resume_after_an_interruption_gives_the_same_files(golden_model, data_zip, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    evaluate(golden_model, data_zip, None, whole, **SEARCH)
    cut = tmp_path / "cut"

    def stop(done, total):
        if done >= 4:
            raise KeyboardInterrupt  # as Ctrl-C after the first batch
    with pytest.raises(KeyboardInterrupt):
        evaluate(golden_model, data_zip, None, cut, progress=stop, **SEARCH)
    logged = (cut / "predictions.jsonl").read_text().splitlines()
    assert len(logged) == 4 and not (cut / "metrics.json").exists()
    with open(cut / "predictions.jsonl", "a") as log:
        log.write('{"name": "d", "spl')  # a line cut short, as by kill -9
    decoded = []
    real = evaluation_run.decode_batches
    monkeypatch.setattr(evaluation_run, "decode_batches",
                        lambda model, batches, *a, **k: decoded.extend(len(b[0]) for b in batches) or real(model, batches, *a, **k))
    with pytest.raises(ValueError, match="other settings"):
        evaluate(golden_model, data_zip, None, cut, resume=True, beam_size=2, max_len=8)
    evaluate(golden_model, data_zip, None, cut, resume=True, **SEARCH)
    assert sum(decoded) == len(SPLIT_2014) + len(SPLIT_2016) - 4  # the first batch not redone
    for name in ("predictions.jsonl", "metrics.json", "2014/result.zip", "2016/result.zip"):
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name


def test_checkpoint_search_settings_are_used(golden_model, data_zip, tmp_path):
    path = tmp_path / "comer.ckpt"
    torch.save({"state_dict": {"comer_model." + k: v for k, v in golden_model.state_dict().items()},
                "hyper_parameters": {**golden_model.config.__dict__, "beam_size": 2, "max_len": 6, "alpha": 0.5}}, path)
    from_checkpoint = evaluate(path, data_zip, "2016")
    assert from_checkpoint.settings == {"beam_size": 2, "max_len": 6, "alpha": 0.5, "early_stopping": False, "temperature": 1.0}
    assert from_checkpoint.records == evaluate(golden_model, data_zip, "2016", beam_size=2, max_len=6, alpha=0.5).records
    assert evaluate(path, data_zip, "2016", max_len=7).settings["max_len"] == 7


def test_worker_processes_answer_as_one(golden_model, data_zip):
    one = evaluate(golden_model, data_zip, "2014", workers=1, **SEARCH)
    assert evaluate(golden_model, data_zip, "2014", workers=2, **SEARCH).records == one.records


def test_limit_takes_the_first_captions(golden_model, data_zip):
    result = evaluate(golden_model, data_zip, ["2014", "2016"], limit=2, **SEARCH)
    assert [(r["split"], r["name"]) for r in result.records] == [("2014", "a"), ("2014", "b"), ("2016", "g"), ("2016", "h")]


@requires_gpu
def test_cuda_gives_the_cpu_answers(golden_model, data_zip):
    cpu = evaluate(golden_model, data_zip, "2014", **SEARCH)
    cuda = evaluate(golden_model.cuda(), data_zip, "2014", **SEARCH)
    assert [r["latex"] for r in cuda.records] == [r["latex"] for r in cpu.records]
    assert [r["score"] for r in cuda.records] == pytest.approx([r["score"] for r in cpu.records], rel=1e-9)


@pytest.mark.parametrize("settings, message", [
    (dict(beam_size=0), "beam_size"), (dict(max_len=1), "max_len"), (dict(batching="pairs"), "batching"),
    (dict(limit=0), "limit"),
])
def test_bad_settings_fail_before_anything_is_written(golden_model, data_zip, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        evaluate(golden_model, data_zip, "2014", tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()
