"""Property-based: small random models, settings and inputs, edge values included (NaN and
infinite pixels and settings, all-padding images, 1x1 images, batches of 0, wrong types and
dtypes, negative alpha): the engine, greedy search and decode_images answer as the reference,
or raise the reference's error (same type, same message). Bounded for CI: a few dozen small
examples, derandomized (the same examples on every run)."""
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcomer import beam_search, decode_images, greedy_search, reference_beam_search
from fastcomer.search.options import check_search_args

from support.random_models import random_images, random_model
from support.search_cases import RTOL, assert_same_search, slow_greedy

# One mistake per example at most (none in about half of them), so that most examples search.
MISTAKES = (None,) * 16 + (
    ("beam_size", 0), ("beam_size", 2.5), ("beam_size", True), ("beam_size", 1000), ("max_len", 1),
    ("max_len", 8.0), ("max_len", 10**6), ("alpha", float("nan")), ("alpha", float("inf")), ("temperature", 0.0),
    ("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")), ("early_stopping", 1),
    "nan_pixel", "inf_pixel", "all_padding", "float32_image",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not spin a second one on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def model_of(seed: int):
    return random_model(seed)


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2))
    batch = draw(st.sampled_from([1, 2, 0, 1, 2]))  # a batch of 0 now and then, not as often as integers() draws it
    padded = draw(st.booleans())
    if padded:
        sizes = [(draw(st.integers(1, 40)), draw(st.integers(1, 40))) for _ in range(batch)]
    else:  # one size: decode_images batches them as the reference does
        sizes = [(draw(st.integers(1, 40)), draw(st.integers(1, 40)))] * batch
    img, mask = random_images(seed, sizes) if batch else (torch.zeros(0, 1, 16, 16, dtype=torch.float64),
                                                         torch.zeros(0, 16, 16, dtype=torch.bool))
    mistake = draw(st.sampled_from(MISTAKES if batch else [m for m in MISTAKES if not isinstance(m, str)]))
    if mistake in ("nan_pixel", "inf_pixel"):
        img[-1, 0, draw(st.integers(0, img.shape[2] - 1)), draw(st.integers(0, img.shape[3] - 1))] = \
            float("nan") if mistake == "nan_pixel" else float("-inf")
    elif mistake == "all_padding":
        mask[0] = True
    elif mistake == "float32_image":
        img = img.float()
    search = dict(  # valid values, edges included
        beam_size=draw(st.sampled_from([1, 2, 3])),
        max_len=draw(st.sampled_from([2, 3, 6, 8])),
        alpha=draw(st.sampled_from([1.0, 0.0, -1.0, 2.5])),
        early_stopping=draw(st.booleans()),
        temperature=draw(st.sampled_from([1.0, 0.5, 2.0, 1e-3])),
    )
    if isinstance(mistake, tuple):
        search[mistake[0]] = mistake[1]
    corruption = mistake if isinstance(mistake, str) else "none"
    return seed, img, mask, padded, corruption, search


def outcome(run):
    """('ok', result), or the type and message of the clear error it raised."""
    try:
        return "ok", run()
    except (TypeError, ValueError) as error:
        return type(error), str(error)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_engine_greedy_and_decode_images_against_the_reference(case):
    seed, img, mask, padded, corruption, search = case
    model = model_of(seed)
    ref = outcome(lambda: reference_beam_search(model, img, mask, **search, return_details=True))
    out = outcome(lambda: beam_search(model, img, mask, **search, return_details=True))
    if ref[0] == "ok":
        assert out[0] == "ok", out
        assert_same_search(out[1], ref[1])
    else:
        assert out == ref

    greedy_settings = {k: search[k] for k in ("max_len", "alpha", "temperature")}

    def expected_greedy():
        check_search_args(model, img, mask, 1, **greedy_settings)
        with torch.no_grad():
            return slow_greedy(model, img, mask, **greedy_settings, forward=True)

    expected, greedy = outcome(expected_greedy), outcome(lambda: greedy_search(model, img, mask, **greedy_settings))
    if expected[0] == "ok":
        assert greedy[0] == "ok", greedy
        assert [h.seq for h in greedy[1]] == [seq for seq, _ in expected[1]]
        assert [h.score for h in greedy[1]] == pytest.approx([score for _, score in expected[1]], rel=RTOL)
    else:
        assert greedy == expected

    if not padded and corruption == "none":  # decode_images pads by itself: no padding and no mask to corrupt
        images = outcome(lambda: decode_images(model, list(img), batch_size=max(len(img), 1), **search))
        if ref[0] == "ok":
            assert images[0] == "ok", images
            assert [h.seq for h in images[1]] == [h.seq for h in ref[1].hyps]
            assert [h.score for h in images[1]] == pytest.approx([h.score for h in ref[1].hyps], rel=RTOL)
        elif len(img):
            assert images == ref
