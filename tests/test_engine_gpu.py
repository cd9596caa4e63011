"""The engine on a GPU with CUDA graphs (skipped without one): captures succeed (a failed
capture warns, and warnings are errors here), replays give the eager steps' results
bitwise, and answers equal the reference beam search's."""
import warnings

import pytest
import torch

import fastcomer.search.engine as engine
from fastcomer import beam_search, reference_beam_search
from fastcomer.checkpoint import load_comer

from test_engine import assert_same_search, random_search_case

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)


def graphed_search(model, img, mask, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = beam_search(model, img, mask, **settings, return_details=True, graphs=True)
    batches = engine._graph_batches[model.decoder][1].values()
    assert any(batch.run.graphs for batch in batches), "no step was replayed from a graph"
    return out


def test_golden_float64(golden):
    """float64 runs the torch step: answers, first-pass scores and rescoring as the reference's."""
    model = load_comer(golden, config={"dropout": 0.0}).cuda()
    img, mask = golden["imgs"].cuda(), golden["img_mask"].cuda()
    config = {**golden["beam_config"], "max_len": 80}  # more than one window, several replays per graph
    out = graphed_search(model, img, mask, **config)
    assert_same_search(out, reference_beam_search(model, img, mask, **config, return_details=True))


@pytest.mark.parametrize("seed", range(6))
def test_random_models_float64(seed):
    model, img, mask, settings = random_search_case(seed)
    model, img, mask = model.cuda(), img.cuda(), mask.cuda()
    settings["max_len"] = 40
    for _ in range(2):  # the second search replays the first one's graphs
        out = graphed_search(model, img, mask, **settings)
        assert_same_search(out, reference_beam_search(model, img, mask, **settings, return_details=True))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_graphs_replay_the_eager_kernels(golden, backend):
    """float32 on the fused kernels: graph replays and eager steps agree bitwise, and the
    answers are the float32 reference's."""
    from fastcomer.backend import cuda_extension_status

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
