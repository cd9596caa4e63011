"""The decoding engine against CoMER's beam search: the golden file, and the reference
search on seeded random models (float64, answers identical, scores to ~1e-12)."""
import random
import warnings

import pytest
import torch

from fastcomer import beam_search, decode_images, greedy_search, reference_beam_search
from fastcomer.search.reference import FinishedHypotheses
from fastcomer.ops.beam_scorer_step.finished_lists import FinishedLists
from fastcomer.checkpoint import load_comer
from fastcomer.search.kept_slots import kept_slots

from support.asserts import assert_close_rel
from support.tolerances import RTOL as RTOLS, RTOL_GOLDEN_SCORES
from support.markers import requires_gpu
from support.random_models import random_images, random_model
from support.search_cases import RTOL, assert_same_search, random_search_case, slow_greedy

def test_golden(golden, golden_model, golden_reference_search):
    out = beam_search(golden_model, golden["imgs"], golden["img_mask"], **golden["beam_config"], return_details=True)
    assert out.first_pass_hyps == golden["first_pass_hyps"]
    assert_close_rel(out.first_pass_scores, golden["first_pass_scores"], RTOL_GOLDEN_SCORES, "first-pass scores")
    half = len(out.rescore) // 2  # the golden rescoring is in CoMER's order: right-to-left first
    assert_close_rel(out.rescore, torch.cat((golden["rescore"][half:], golden["rescore"][:half])), RTOLS[torch.float64], "rescore")
    assert [h.seq for h in out.hyps] == golden["beam_hyps"]
    assert_close_rel([h.score for h in out.hyps], golden["beam_scores"], RTOL_GOLDEN_SCORES, "final scores")
    assert_same_search(out, golden_reference_search)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(24))
def test_matches_reference(seed):
    model, img, mask, settings = random_search_case(seed)
    out = beam_search(model, img, mask, **settings, return_details=True)
    ref = reference_beam_search(model, img, mask, **settings, return_details=True)
    assert_same_search(out, ref)


def test_random_cases_cover_the_search():
    """The random cases reach the paths that matter: hypotheses that end early and at
    max_len, in both directions, beam sizes from 1 to 12, early stopping on and off."""
    lengths, beams, stopping = set(), set(), set()
    for seed in range(24):
        _, _, _, settings = random_search_case(seed)
        beams.add(settings["beam_size"])
        stopping.add(settings["early_stopping"])
    assert min(beams) == 1 and max(beams) >= 11 and stopping == {True, False}
    model, img, mask, settings = random_search_case(5)
    out = beam_search(model, img, mask, **{**settings, "max_len": 24}, return_details=True)
    lengths = {len(h) for h in out.first_pass_hyps}
    assert 23 in lengths and min(lengths) < 10


@pytest.mark.parametrize("direction, block", [("l2r", 0), ("r2l", 1)])
def test_single_direction(direction, block):
    """A direction's searches are independent of the other's: they are the matching half of
    the bidirectional first pass, and the answer is the best first-pass hypothesis."""
    model, img, mask, settings = random_search_case(6)
    both = reference_beam_search(model, img, mask, **settings, return_details=True)
    out = beam_search(model, img, mask, **settings, return_details=True, direction=direction)
    n = len(both.first_pass_hyps) // 2
    assert out.first_pass_hyps == both.first_pass_hyps[block * n : (block + 1) * n]
    assert torch.equal(out.first_pass_scores, both.first_pass_scores[block * n : (block + 1) * n])
    assert out.rescore is None
    beam = settings["beam_size"]
    for image, hyp in enumerate(out.hyps):
        scores = out.first_pass_scores[image * beam : (image + 1) * beam]
        best = image * beam + int(scores.argmax())
        expected = out.first_pass_hyps[best] if direction == "l2r" else out.first_pass_hyps[best][::-1]
        assert hyp.seq == expected and hyp.score == float(scores.max())


@pytest.mark.slow
@pytest.mark.parametrize("seed, direction", [(2, "l2r"), (3, "r2l"), (7, "l2r")])
def test_greedy(seed, direction):
    model, img, mask, _ = random_search_case(seed)
    out = greedy_search(model, img, mask, max_len=20, alpha=0.8, temperature=1.3, direction=direction)
    with torch.no_grad():
        expected = slow_greedy(model, img, mask, 20, 0.8, 1.3, direction == "l2r")
    assert [h.seq for h in out] == [seq for seq, _ in expected]
    assert_close_rel([h.score for h in out], [score for _, score in expected], RTOL, "greedy scores")


def test_decode_images_matches_per_image():
    model = random_model(4)
    rng = random.Random(4)
    sizes = [(48, 64), (32, 96), (64, 32)] * 2
    rng.shuffle(sizes)
    images = [random_images(i, [size])[0][0] for i, size in enumerate(sizes)]
    settings = dict(beam_size=3, max_len=12)
    answers = decode_images(model, [im if i % 2 else im[0] for i, im in enumerate(images)], batch_size=2, **settings)
    for im, answer in zip(images, answers):
        (alone,) = beam_search(model, im[None], torch.zeros(im.shape, dtype=torch.bool), **settings)
        assert answer.seq == alone.seq
        assert_close_rel(answer.score, alone.score, RTOL, "score")


def test_finished_lists_match_comer_with_ties():
    """The vectorised finished lists against CoMER's per-item lists, on candidate streams
    full of exactly tied scores: same entries, same order, same done flags."""
    rng = random.Random(0)
    for trial in range(30):
        beam, items, alpha = rng.randint(1, 6), 4, rng.choice([1.0, 0.5])
        early = rng.random() < 0.3
        lists = FinishedLists(items, beam, 12, alpha, early, "cpu")
        expected = [FinishedHypotheses(beam, alpha, early) for _ in range(items)]
        tokens = torch.randint(3, 20, (items * beam, 12))
        for length in range(1, 12):
            sums = torch.tensor([sorted((-rng.choice([1, 2, 3, 4]) * length / 2.0 for _ in range(beam)), reverse=True) for _ in range(items)], dtype=torch.float64)
            offered = torch.rand(items, beam) < 0.6
            rows = torch.randint(0, items * beam, (items, beam))
            lists.add(sums, offered, rows, tokens, torch.tensor(length))
            for i in range(items):
                for j in range(beam):
                    if offered[i, j]:
                        expected[i].add(tokens[rows[i, j], :length].tolist(), sums[i, j].item())
            best = -torch.rand(items, dtype=torch.float64) * length
            done = lists.is_done(best, torch.tensor(length))
            assert done.tolist() == [e.is_done(b, length) for e, b in zip(expected, best.tolist())]
        hyps, scores = lists.results()
        assert hyps == [t[1:] for e in expected for _, t in e.beams]
        assert scores.tolist() == torch.tensor([s for e in expected for s, _ in e.beams], dtype=torch.float32).tolist()


def test_bad_arguments(golden_model):
    img, mask = random_images(0, [(32, 32)])
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(golden_model, img, mask, beam_size=0)
    with pytest.raises(ValueError, match="max_len"):
        beam_search(golden_model, img, mask, max_len=1)
    with pytest.raises(ValueError, match="temperature"):
        greedy_search(golden_model, img, mask, temperature=0.0)
    with pytest.raises(ValueError, match="direction"):
        beam_search(golden_model, img, mask, direction="up")
    with pytest.raises(ValueError, match="direction"):
        greedy_search(golden_model, img, mask, direction="both")
    with pytest.raises(ValueError, match="img_mask"):
        beam_search(golden_model, img, mask[:, :16])
    with pytest.raises(ValueError, match="batch_size"):
        decode_images(golden_model, [img[0]], batch_size=0)
    with pytest.raises(ValueError, match="image 1"):
        decode_images(golden_model, [img[0], img])
    with pytest.raises(ValueError, match="eval mode"):
        beam_search(golden_model.train(), img, mask)

def graphed_search(model, img, mask, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = beam_search(model, img, mask, **settings, return_details=True, graphs=True)
    batches = kept_slots(model.decoder).values()
    assert any(batch.run.graphs for batch in batches), "no step was replayed from a graph"
    return out


@requires_gpu
def test_golden_float64(golden):
    """float64 runs the torch step: answers, first-pass scores and rescoring as the reference's."""
    model = load_comer(golden, config={"dropout": 0.0}).cuda()
    img, mask = golden["imgs"].cuda(), golden["img_mask"].cuda()
    config = {**golden["beam_config"], "max_len": 80}  # more than one window, several replays per graph
    out = graphed_search(model, img, mask, **config)
    assert_same_search(out, reference_beam_search(model, img, mask, **config, return_details=True))


@requires_gpu
@pytest.mark.parametrize("seed", range(6))
def test_random_models_float64(seed):
    model, img, mask, settings = random_search_case(seed)
    model, img, mask = model.cuda(), img.cuda(), mask.cuda()
    settings["max_len"] = 40
    for _ in range(2):  # the second search replays the first one's graphs
        out = graphed_search(model, img, mask, **settings)
        assert_same_search(out, reference_beam_search(model, img, mask, **settings, return_details=True))


@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_graphs_replay_the_eager_kernels(golden, backend):
    """float32 on the fused kernels: graph replays and eager steps agree bitwise, and the
    answers are the float32 reference's."""
    from fastcomer.backends import cuda_extension_status

    if backend == "cuda" and cuda_extension_status()[0] is None:
        pytest.skip(cuda_extension_status()[1])
    model = load_comer(golden, config={"dropout": 0.0}).float().cuda()
    img, mask = golden["imgs"].float().cuda(), golden["img_mask"].cuda()
    config = {**golden["beam_config"], "max_len": 80, "backend": backend}
    graphed = graphed_search(model, img, mask, **config)
    eager = beam_search(model, img, mask, **config, return_details=True, graphs=False)
    assert graphed.first_pass_hyps == eager.first_pass_hyps
    assert torch.equal(graphed.first_pass_scores, eager.first_pass_scores)
    ref = reference_beam_search(model, img, mask, **{k: v for k, v in config.items() if k != "backend"})
    assert [h.seq for h in graphed.hyps] == [h.seq for h in ref]
