"""float16 and bfloat16 models decode (engine, greedy, reference) and beam_search runs under
torch.autocast; on inputs where the float32 model's choices win by large margins, the answers
are the float32 model's. The margins are measured, so a case that would be a near-tie in
half precision is not compared (and the test asserts that enough cases are)."""
import pytest
import torch
import torch.nn.functional as F

from fastcomer import beam_search, greedy_search, reference_beam_search
from fastcomer.vocab import SOS_IDX

from support.random_models import random_images, random_model
from support.tolerances import HALF_SEARCH_SCORE_RTOL as SCORE_RTOL

HALF = [torch.float16, torch.bfloat16]
# bfloat16 keeps 8 bits of mantissa: relative errors ~1e-2 through the network; a margin of
# 0.5 nats between the float32 model's best choice and the next is far beyond them.
MARGIN = 0.5
# Random models and images whose float32 answers win by more than MARGIN (checked below)
SEEDS = (0, 4, 6)
SIZE = (16, 32)
MAX_LEN = 8


def greedy_margin(model, img, mask, hyps) -> float:
    """The smallest gap, over every step of every answer (its end token included), between the
    float32 model's chosen token's log-probability and the runner-up's."""
    feature, fmask = model.encoder(img, mask)
    smallest = float("inf")
    for i, hyp in enumerate(hyps):
        tokens = torch.tensor([[SOS_IDX, *hyp.seq]])
        logprobs = F.log_softmax(model.decoder(feature[i : i + 1], fmask[i : i + 1], tokens)[0].detach(), dim=-1)
        top2 = logprobs[: len(hyp.seq) + (len(hyp.seq) + 1 < MAX_LEN)].topk(2, dim=-1).values
        smallest = min(smallest, float((top2[:, 0] - top2[:, 1]).min()))
    return smallest


def beam_margin(details) -> float:
    """Per image, the gap between the best final score and the best score of any other sequence."""
    scores = details.first_pass_scores.double() + details.rescore.double()
    smallest = float("inf")
    per_image = len(scores) // len(details.hyps)
    for i, best in enumerate(details.hyps):
        l2r = range(i * per_image // 2, (i + 1) * per_image // 2)
        r2l = range(len(scores) // 2 + i * per_image // 2, len(scores) // 2 + (i + 1) * per_image // 2)
        # right-to-left hypotheses are in decoding order: reversed, they are sequences
        candidates = [(j, details.first_pass_hyps[j]) for j in l2r] + [(j, details.first_pass_hyps[j][::-1]) for j in r2l]
        others = [float(scores[j]) for j, seq in candidates if seq != best.seq]
        smallest = min(smallest, best.score - max(others, default=-float("inf")))
    return smallest


def large_margin_case(seed):
    """A float32 model and image whose greedy and beam answers win by more than MARGIN."""
    model = random_model(seed, torch.float32).eval()
    img, mask = random_images(seed, [SIZE], torch.float32)
    with torch.no_grad():
        greedy = greedy_search(model, img, mask, max_len=MAX_LEN)
        details = beam_search(model, img, mask, beam_size=2, max_len=MAX_LEN, return_details=True)
        assert greedy_margin(model, img, mask, greedy) > MARGIN and beam_margin(details) > MARGIN, "not a large-margin case"
    return model, img, mask, greedy, details.hyps


def assert_same_answers(got, expected, dtype):
    assert [h.seq for h in got] == [h.seq for h in expected]
    for g, e in zip(got, expected):
        assert abs(g.score - e.score) <= SCORE_RTOL[dtype] * max(1.0, abs(e.score))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("seed", SEEDS)
def test_half_models_match_float32(seed, dtype):
    _, img, mask, greedy, beam = large_margin_case(seed)
    half = random_model(seed, torch.float32).to(dtype).eval()
    img = img.to(dtype)
    assert_same_answers(greedy_search(half, img, mask, max_len=MAX_LEN), greedy, dtype)
    assert_same_answers(beam_search(half, img, mask, beam_size=2, max_len=MAX_LEN), beam, dtype)
    assert_same_answers(reference_beam_search(half, img, mask, beam_size=2, max_len=MAX_LEN), beam, dtype)


@pytest.mark.parametrize("seed", SEEDS)
def test_beam_search_under_autocast(seed):
    model, img, mask, _, beam = large_margin_case(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_same_answers(beam_search(model, img, mask, beam_size=2, max_len=MAX_LEN), beam, torch.bfloat16)
