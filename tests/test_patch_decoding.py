"""patch() routes the public CoMER code's decoding to the engine; the search functions and
load_comer accept its CoMER and LitCoMER (a structural stand-in always, the real code when
it is importable), over the same tensors."""
import copy

import pytest
import torch
import torch.nn as nn

import fastcomer
import fastcomer.search.engine as engine
from fastcomer.model.adapt import as_comer
from fastcomer.patch import EngineBeamSearch

from support.public_comer import public_comer_module, standin_lit_comer
from support.random_models import random_images, random_model

SEARCH = dict(beam_size=2, max_len=6, alpha=1.0, early_stopping=False, temperature=1.0)


def images(seed=0):
    return random_images(seed, [(16, 32), (16, 24)], torch.float64)


def answers(hyps):
    return [(h.seq, float(h.score)) for h in hyps]


def assert_same_answers(got, expected):
    assert [h.seq for h in got] == [h.seq for h in expected]
    assert [float(h.score) for h in got] == pytest.approx([float(h.score) for h in expected], rel=1e-9)


def test_patched_litcomer_searches_with_the_engine(monkeypatch):
    lit = standin_lit_comer(3, torch.float64, **SEARCH)
    img, mask = images()
    original = lit.approximate_joint_search(img, mask)
    direct = lit.comer_model.beam_search(img, mask, **SEARCH)

    assert fastcomer.patch(lit, backend="torch") is lit
    assert isinstance(lit.comer_model.__dict__["beam_search"], EngineBeamSearch)
    calls = []
    engine_beam_search = engine.beam_search

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return engine_beam_search(*args, **kwargs)

    monkeypatch.setattr(engine, "beam_search", counting)
    assert_same_answers(lit.approximate_joint_search(img, mask), original)  # LitCoMER's own code, unchanged
    assert_same_answers(lit.comer_model.beam_search(img, mask, **SEARCH), direct)
    assert len(calls) == 2 and calls[0]["backend"] == "torch"

    fastcomer.unpatch(lit)
    assert "beam_search" not in lit.comer_model.__dict__
    calls.clear()
    assert_same_answers(lit.approximate_joint_search(img, mask), original)
    assert not calls


def test_patched_search_sees_later_weight_changes():
    lit = standin_lit_comer(4, torch.float64, **SEARCH)
    fastcomer.patch(lit, backend="torch")
    img, mask = images(1)
    lit.approximate_joint_search(img, mask)  # builds and keeps the view
    other_lit = standin_lit_comer(4, torch.float64, **SEARCH)  # same shapes, weights not yet stepped
    with torch.no_grad():  # an optimiser step: in place
        for p in lit.parameters():
            p.mul_(1.05)
    stepped = lit.approximate_joint_search(img, mask)
    fastcomer.unpatch(lit)
    assert_same_answers(stepped, lit.approximate_joint_search(img, mask))
    fastcomer.patch(lit, backend="torch")
    lit.comer_model.load_state_dict(other_lit.comer_model.state_dict())  # load_state_dict: in place too
    assert_same_answers(lit.approximate_joint_search(img, mask), other_lit.approximate_joint_search(img, mask))


def test_training_mode_runs_the_original(monkeypatch):
    lit = fastcomer.patch(standin_lit_comer(3, torch.float64, **SEARCH), backend="torch")
    img, mask = images()
    expected = lit.approximate_joint_search(img, mask)

    def engine_must_not_run(*args, **kwargs):
        raise AssertionError("the engine ran on a model in training mode")

    monkeypatch.setattr(engine, "beam_search", engine_must_not_run)
    lit.train()
    assert answers(lit.approximate_joint_search(img, mask)) == answers(expected)


@pytest.mark.parametrize("which", ["comer_model", "lit"])
def test_search_functions_accept_public_modules(which):
    lit = standin_lit_comer(6, torch.float64)
    model = lit if which == "lit" else lit.comer_model
    plain = random_model(6, torch.float64).eval()
    img, mask = images(2)
    assert_same_answers(fastcomer.beam_search(model, img, mask, **SEARCH), fastcomer.beam_search(plain, img, mask, **SEARCH))
    assert_same_answers(fastcomer.greedy_search(model, img, mask, max_len=8), fastcomer.greedy_search(plain, img, mask, max_len=8))
    ims = [img[0], img[1, :, :16, :24]]
    assert_same_answers(fastcomer.decode_images(model, ims, beam_size=2, max_len=8),
                        fastcomer.decode_images(plain, ims, beam_size=2, max_len=8))


def test_view_shares_tensors_and_follows_the_source():
    lit = standin_lit_comer(6, torch.float32)
    view = as_comer(lit)
    source = dict(lit.comer_model.named_parameters()) | dict(lit.comer_model.named_buffers())
    mine = dict(view.named_parameters()) | dict(view.named_buffers())
    assert mine.keys() == source.keys() and all(mine[k] is source[k] for k in source)
    assert view.config == random_model(6).config
    assert as_comer(lit) is view and as_comer(lit.comer_model) is view
    lit.train()
    assert as_comer(lit).training and as_comer(lit).encoder.model.norm1.training
    lit.double()  # replaces the buffers: a new view over the new tensors
    view = as_comer(lit.eval())
    assert not view.training and all(t.dtype == torch.float64 for t in view.state_dict().values() if t.is_floating_point())
    assert view.decoder.pos_enc.pe is lit.comer_model.decoder.pos_enc.pe


def test_load_comer_accepts_a_module():
    lit = standin_lit_comer(7, torch.float32).train()
    model = fastcomer.load_comer(lit)
    assert isinstance(model, fastcomer.CoMER) and not model.training
    assert model.decoder.proj.weight is lit.comer_model.decoder.proj.weight
    assert lit.training  # the source's flags are its own
    plain = random_model(7)
    assert fastcomer.load_comer(plain) is plain


def test_not_a_comer_is_refused():
    with pytest.raises(TypeError, match="model must be fastcomer's CoMER"):
        fastcomer.beam_search(nn.Linear(2, 2), *images())
    lit = standin_lit_comer(3)
    del lit.comer_model.decoder.model.layers[0].linear1.bias
    with pytest.raises(TypeError, match="does not have CoMER's parameters"):
        as_comer(lit)


@pytest.mark.skipif(public_comer_module() is None, reason="the public CoMER code (comer, pytorch_lightning) is not importable")
def test_real_litcomer():
    lit_comer = public_comer_module()
    torch.manual_seed(0)
    lit = lit_comer.LitCoMER(d_model=32, growth_rate=4, num_layers=2, nhead=4, num_decoder_layers=2, dim_feedforward=64,
                             dropout=0.1, dc=8, cross_coverage=True, self_coverage=True, learning_rate=0.08, patience=20,
                             **SEARCH).double().eval()
    img, mask = images()
    original = lit.approximate_joint_search(img, mask)
    fastcomer.patch(lit, backend="torch")
    assert_same_answers(lit.approximate_joint_search(img, mask), original)
    fastcomer.unpatch(copy.deepcopy(lit))
