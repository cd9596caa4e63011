"""On a GPU, what issue 19's kernel reading found (each is also caught on the CPU elsewhere):
half models on the Triton step, two searches at once with CUDA graphs (thread-local captures,
per-list scorer clocks), and a model on a non-zero device index. Skipped without CUDA."""
import threading
import warnings

import pytest
import torch

from fastcomer import beam_search, load_comer
from support.asserts import assert_close_rel
from support.markers import requires_gpu

pytestmark = requires_gpu


def _golden_on(golden, device, dtype):
    model = load_comer(golden, config={"dropout": 0.0}).to(device, dtype).eval()
    return model, golden["imgs"].to(device, dtype), golden["img_mask"].to(device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_on_the_triton_step(golden, dtype):
    model, img, mask = _golden_on(golden, "cuda", dtype)
    args = dict(beam_size=3, max_len=20, return_details=True)
    fused = beam_search(model, img, mask, backend="triton", **args)
    plain = beam_search(model, img, mask, backend="torch", **args)
    # half rounding may flip near-ties between the paths: the scores are compared, to a few eps
    assert_close_rel(fused.first_pass_scores, plain.first_pass_scores, 8 * torch.finfo(dtype).eps, "first-pass scores")


def test_two_searches_at_once(golden):
    """Two threads search with CUDA graphs at once: each answer is that search's alone."""
    model, img, mask = _golden_on(golden, "cuda", torch.float32)
    args = dict(beam_size=3, max_len=40, return_details=True, graphs=True, backend="triton")
    inputs = [(img[:1], mask[:1]), (img[1:], mask[1:])]
    alone = [beam_search(model, i, m, **args) for i, m in inputs]
    together, errors = [None, None], []

    def search(k):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a failed capture warns
                together[k] = beam_search(model, *inputs[k], **args)
        except Exception as err:  # reported below, from the main thread
            errors.append(err)

    threads = [threading.Thread(target=search, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(together, alone):
        assert got.first_pass_hyps == want.first_pass_hyps
        assert torch.equal(got.first_pass_scores, want.first_pass_scores)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_model_on_a_second_gpu(golden, backend):
    """A model on cuda:1, the current device cuda:0: the kernels launch on the tensors' device."""
    model, img, mask = _golden_on(golden, "cuda:1", torch.float32)
    got = beam_search(model, img, mask, beam_size=3, max_len=20, backend=backend, return_details=True)
    model0, img0, mask0 = _golden_on(golden, "cuda:0", torch.float32)
    want = beam_search(model0, img0, mask0, beam_size=3, max_len=20, backend=backend, return_details=True)
    assert got.first_pass_hyps == want.first_pass_hyps
    assert_close_rel(got.first_pass_scores.cpu(), want.first_pass_scores.cpu(), 1e-5, "first-pass scores")
