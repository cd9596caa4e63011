"""The decoding engine with its cross-attention step on the Triton kernel (through the
interpreter, on CPU) against the engine's torch step, on small float32 random models."""
import os

import pytest
import torch

from support.asserts import assert_close_rel
from fastcomer import beam_search, greedy_search
from support.interpreter_dot import exact_bfloat16_dot
from support.random_models import random_images, random_model

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (tests/run.sh does it)", allow_module_level=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_on_the_triton_step(seed):
    model = random_model(seed, torch.float32).eval()
    img, img_mask = random_images(seed, [(40, 72), (24, 100)], torch.float32)
    args = dict(beam_size=3, max_len=8, return_details=True)
    fused = beam_search(model, img, img_mask, backend="triton", **args)
    plain = beam_search(model, img, img_mask, backend="torch", **args)
    assert fused.first_pass_hyps == plain.first_pass_hyps
    assert [h.seq for h in fused.hyps] == [h.seq for h in plain.hyps]
    assert_close_rel(fused.first_pass_scores, plain.first_pass_scores, 1e-5, "first-pass scores")
    assert_close_rel([h.score for h in fused.hyps], [h.score for h in plain.hyps], 1e-5, "final scores")


# The two paths round differently in half precision (float32 refinement and softmax in the
# kernels, the model's dtype in torch's): scores agree to a few of the dtype's eps (measured
# here: 0.6 eps in float16, 1.6 eps in bfloat16).
HALF_SCORE_EPS = 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_on_the_triton_step(dtype, monkeypatch):
    """A float16/bfloat16 model's search on the Triton step: its float32 refinement dots the
    ARM's weights prepared in float32 (in the model's dtype they would not compile)."""
    exact_bfloat16_dot(monkeypatch)
    model = random_model(0, dtype).eval()
    img, img_mask = random_images(0, [(40, 72)], dtype)
    args = dict(beam_size=2, max_len=4, return_details=True)
    fused = beam_search(model, img, img_mask, backend="triton", **args)
    plain = beam_search(model, img, img_mask, backend="torch", **args)
    assert fused.first_pass_hyps == plain.first_pass_hyps
    assert [h.seq for h in fused.hyps] == [h.seq for h in plain.hyps]
    rtol = HALF_SCORE_EPS * torch.finfo(dtype).eps
    assert_close_rel(fused.first_pass_scores, plain.first_pass_scores, rtol, "first-pass scores")
    assert_close_rel([h.score for h in fused.hyps], [h.score for h in plain.hyps], rtol, "final scores")


def test_greedy_search_on_the_triton_step():
    model = random_model(3, torch.float32).eval()
    img, img_mask = random_images(3, [(40, 72), (24, 100)], torch.float32)
    fused = greedy_search(model, img, img_mask, max_len=8, backend="triton")
    plain = greedy_search(model, img, img_mask, max_len=8, backend="torch")
    assert [h.seq for h in fused] == [h.seq for h in plain]
    assert_close_rel([h.score for h in fused], [h.score for h in plain], 1e-5, "scores")


def test_finished_searches_are_skipped(graph_policy, monkeypatch):
    """With done flags read every few steps, the rows of searches that ended meanwhile are
    skipped by the kernel (image index -1); the answers are those of the torch step."""
    from fastcomer.search.decoding_state import DecodingState

    skipped_rows = []
    skip_slots = DecodingState.skip_slots

    def recording_skip_slots(self, skipped):
        skip_slots(self, skipped)
        skipped_rows.append(int((self.image_index < 0).sum()))

    monkeypatch.setattr(DecodingState, "skip_slots", recording_skip_slots)
    model = random_model(0, torch.float32).eval()
    img, img_mask = random_images(0, [(40, 72), (24, 100)], torch.float32)
    args = dict(beam_size=2, max_len=12, early_stopping=True, return_details=True)
    fused = beam_search(model, img, img_mask, backend="triton", **args)
    assert max(skipped_rows) > 0
    plain = beam_search(model, img, img_mask, backend="torch", **args)
    assert fused.first_pass_hyps == plain.first_pass_hyps
    assert [h.seq for h in fused.hyps] == [h.seq for h in plain.hyps]
    assert_close_rel(fused.first_pass_scores, plain.first_pass_scores, 1e-5, "first-pass scores")
