"""Search cases and the comparison of a search with the reference's."""
import random

import torch
import torch.nn.functional as F

from fastcomer.vocab import EOS_IDX, SOS_IDX

from support.asserts import assert_close_rel
from support.tolerances import RTOL_SAME_MATH_FLOAT64
from support.random_models import random_images, random_model

RTOL = RTOL_SAME_MATH_FLOAT64


def assert_same_search(out, ref):
    assert out.first_pass_hyps == ref.first_pass_hyps
    assert out.first_pass_scores.dtype == torch.float32
    assert torch.equal(out.first_pass_scores, ref.first_pass_scores)
    assert_close_rel(out.rescore, ref.rescore, RTOL, "rescore")
    assert [h.seq for h in out.hyps] == [h.seq for h in ref.hyps]
    assert_close_rel([h.score for h in out.hyps], [h.score for h in ref.hyps], RTOL, "final scores")


def random_search_case(seed: int):
    """A random model, a padded batch of 1-3 images of different sizes and search settings."""
    rng = random.Random(1000 + seed)
    sizes = [(rng.choice([32, 48]), rng.choice([32, 64, 80])) for _ in range(rng.randint(1, 3))]
    img, mask = random_images(seed, sizes)
    settings = dict(
        beam_size=seed % 12 + 1,
        max_len=rng.randint(2, 16),
        alpha=rng.choice([1.0, 0.6, 1.4]),
        early_stopping=rng.random() < 0.4,
        temperature=rng.choice([1.0, 0.7, 1.6]),
    )
    return random_model(seed), img, mask, settings


def slow_greedy(model, img, mask, max_len, alpha, temperature, forward):
    """Greedy decoding that re-runs the whole decoder on the prefix at every step: (seq, score) per image."""
    start, end = (SOS_IDX, EOS_IDX) if forward else (EOS_IDX, SOS_IDX)
    feature, fmask = model.encoder(img, mask)
    answers = []
    for image in range(img.shape[0]):
        tokens, total = [start], 0.0
        while len(tokens) < max_len:
            logits = model.decoder(feature[image : image + 1], fmask[image : image + 1], torch.tensor([tokens]))
            logprobs = F.log_softmax(logits[0, -1] / temperature, dim=-1)
            token = int(logprobs.argmax())
            total += float(logprobs[token])
            if token == end:
                break
            tokens.append(token)
        seq = tokens[1:] if forward else tokens[1:][::-1]
        answers.append((seq, total / len(tokens) ** alpha))
    return answers
