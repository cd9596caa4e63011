"""ONNX export (fastcomer.export, `fastcomer export-onnx`): the encoder and the incremental
decoder step run in onnxruntime on the CPU; their logits match the plain model's
teacher-forced decoder in float32, and a greedy search over the ONNX step gives
fastcomer.greedy_search's answers. One export (through the command line) serves the module."""
from dataclasses import asdict

import pytest
import torch

from fastcomer import greedy_search
from fastcomer.benchmarking import scale_weights
from fastcomer.cli import main
from fastcomer.export import ENCODER_FILE, STEP_CACHES, STEP_FILE, onnx_greedy_search

from support.asserts import assert_close_rel
from support.compile_cases import tiny_batch, tiny_model

ort = pytest.importorskip("onnxruntime", reason="the `onnx` extra (onnx, onnxruntime, onnxscript) is not installed")
pytest.importorskip("onnxscript", reason="torch.onnx.export's dynamo exporter needs onnxscript (the `onnx` extra)")

MAX_LEN = 8


@pytest.fixture(scope="module")
def model():
    """Weights scaled so that greedy answers end at various lengths."""
    with torch.no_grad():
        return scale_weights(tiny_model(seed=3), 3, end_bias=0.5, end_scale=4.0)


@pytest.fixture(scope="module")
def onnx_dir(model, tmp_path_factory):
    """The model saved as a Lightning-style checkpoint and exported by the command line."""
    root = tmp_path_factory.mktemp("onnx")
    checkpoint = root / "tiny.ckpt"
    torch.save({"state_dict": {f"comer_model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": asdict(model.config)}, checkpoint)
    img, _, _ = tiny_batch()
    height, width = img.shape[2:]
    assert main(["export-onnx", "--checkpoint", str(checkpoint), str(root / "out"), "--image-size",
                 f"{height}x{width}", "--batch", "2", "--max-len", str(MAX_LEN)]) == 0
    return root / "out"


def test_step_logits_match_teacher_forced_decoder(model, onnx_dir):
    img, img_mask, tgt = tiny_batch(t=MAX_LEN)
    tgt = tgt[:2]  # left-to-right rows without padding, one per image
    with torch.no_grad():
        feature, mask = model.encoder(img, img_mask)
        want = model.decoder(feature, mask, tgt)  # [2, MAX_LEN, vocab]
    encoder = ort.InferenceSession(str(onnx_dir / ENCODER_FILE), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(onnx_dir / STEP_FILE), providers=["CPUExecutionProvider"])
    memory_kv, memory_mask = encoder.run(None, {"img": img.numpy(), "img_mask": img_mask.numpy()})
    assert (memory_mask == mask.reshape(2, -1).numpy()).all()
    shapes = {i.name: i.shape for i in step.get_inputs()}
    caches = {name: torch.zeros(shapes[name]).numpy() for name in STEP_CACHES}
    tokens = torch.full((2, MAX_LEN), 0, dtype=torch.long)
    for position in range(MAX_LEN):
        tokens[:, position] = tgt[:, position]
        logits, *updated = step.run(None, {
            "tokens": tokens.numpy(), "position": torch.tensor(position).numpy(), "memory_kv": memory_kv,
            "memory_mask": memory_mask, **caches})
        caches = dict(zip(STEP_CACHES, updated))
        assert_close_rel(torch.from_numpy(logits), want[:, position], 1e-5, f"logits at position {position}")


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_onnx_greedy_search_matches_engine(model, onnx_dir, direction):
    img, img_mask, _ = tiny_batch()
    want = greedy_search(model, img, img_mask, max_len=MAX_LEN, direction=direction)
    got = onnx_greedy_search(onnx_dir / ENCODER_FILE, onnx_dir / STEP_FILE, img, img_mask, direction=direction)
    assert [h.seq for h in got] == [h.seq for h in want]
    assert_close_rel([h.score for h in got], [h.score for h in want], 1e-5, "scores")
    assert any(len(h.seq) > 2 for h in want)  # several steps were compared, not only an immediate end
