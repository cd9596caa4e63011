"""The engine's CPU threading policy: searches run with the policy's intra-op thread count and
give the caller's back; decode_images' worker processes answer as one process does."""
import pytest
import torch

from fastcomer import beam_search, decode_images, greedy_search
from fastcomer.search.threads import THREADS_ENV, search_threads

from support.random_models import random_images, random_model

SETTINGS = dict(max_len=3)


@pytest.fixture
def caller_threads():
    """The caller runs with 3 intra-op threads; the test's searches must give them back."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(before)


def threads_seen_by_encoder(model, search, **kwargs):
    seen = []
    hook = model.encoder.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        img, mask = random_images(0, [(16, 24)])
        search(model, img, mask, **SETTINGS, **kwargs)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("search", [beam_search, greedy_search])
def test_search_threads_default_argument_and_env(search, caller_threads, monkeypatch):
    model = random_model(0)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert threads_seen_by_encoder(model, search) == [1]
    assert torch.get_num_threads() == caller_threads
    assert threads_seen_by_encoder(model, search, threads=2) == [2]
    assert torch.get_num_threads() == caller_threads
    monkeypatch.setenv(THREADS_ENV, "2")
    assert threads_seen_by_encoder(model, search) == [2]
    assert torch.get_num_threads() == caller_threads


def test_caller_threads_restored_on_error(caller_threads):
    model = random_model(0)

    def fail(*_):
        raise RuntimeError("inside the search")
    hook = model.encoder.register_forward_hook(fail)
    img, mask = random_images(0, [(16, 24)])
    with pytest.raises(RuntimeError, match="inside the search"):
        beam_search(model, img, mask, **SETTINGS)
    hook.remove()
    assert torch.get_num_threads() == caller_threads


def test_bad_thread_counts(monkeypatch):
    with pytest.raises(ValueError, match="threads"):
        search_threads(0)
    with pytest.raises(TypeError, match="threads"):
        search_threads(1.5)
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(ValueError, match=THREADS_ENV):
        search_threads(None)


def test_decode_images_workers_answer_as_one_process():
    model = random_model(4)
    sizes = [(24, 32), (16, 40), (24, 32)]
    images = [random_images(i, [size])[0][0] for i, size in enumerate(sizes)]
    settings = dict(beam_size=3, max_len=8)
    alone = decode_images(model, images, workers=1, **settings)
    spread = decode_images(model, images, workers=2, **settings)
    assert [(h.seq, h.score) for h in spread] == [(h.seq, h.score) for h in alone]
    with pytest.raises(ValueError, match="workers"):
        decode_images(model, images, workers=0)
