"""load_comer: Lightning checkpoints, bare state dicts, shape inference, and clear errors."""
import pytest
import torch

from fastcomer import CheckpointError, CoMER, CoMERConfig, load_comer

SMALL = dict(d_model=32, growth_rate=4, num_layers=2, nhead=4, num_decoder_layers=2, dim_feedforward=48, dropout=0.1, dc=8)


def small_state(**overrides):
    torch.manual_seed(0)
    model = CoMER(**{**SMALL, **overrides})
    return model, model.state_dict()


def assert_same_state(model, state):
    got = model.state_dict()
    assert got.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(got[key], value.to(got[key].dtype)), key


def test_lightning_checkpoint_file_with_hyper_parameters(tmp_path):
    model, state = small_state()
    hparams = {**SMALL, "cross_coverage": True, "self_coverage": True, "beam_size": 10, "learning_rate": 0.08}
    path = tmp_path / "comer.ckpt"
    torch.save({"state_dict": {"comer_model." + k: v for k, v in state.items()}, "hyper_parameters": hparams, "epoch": 3}, path)
    loaded = load_comer(path, map_location="cpu")
    assert loaded.config == model.config
    assert not loaded.training
    assert_same_state(loaded, state)


@pytest.mark.parametrize("prefix", ["", "comer_model."])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"nhead": 2, "dc": 4, "num_decoder_layers": 3}, {"cross_coverage": False, "self_coverage": False}],
)
def test_bare_state_dict_infers_config(prefix, overrides):
    model, state = small_state(**overrides)
    loaded = load_comer({prefix + k: v for k, v in state.items()})
    expected = model.config
    if expected.cross_coverage:
        assert loaded.config == CoMERConfig(**{**expected.__dict__, "dropout": 0.3})
    else:  # no ARM: nhead is not in any shape, the published 8 is assumed
        assert loaded.config == CoMERConfig(**{**expected.__dict__, "dropout": 0.3, "nhead": 8, "dc": 32})
    assert_same_state(loaded, state)


def test_single_coverage_needs_a_hint():
    _, state = small_state(cross_coverage=False, self_coverage=True)
    with pytest.raises(CheckpointError, match="decoder.model.arm.conv.weight"):
        load_comer(state)
    loaded = load_comer(state, config={"cross_coverage": False, "self_coverage": True})
    assert (loaded.config.cross_coverage, loaded.config.self_coverage) == (False, True)
    assert_same_state(loaded, state)


def test_dtype_follows_checkpoint(golden):
    model = load_comer(golden)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert torch.equal(model.decoder.model.arm.conv.weight, golden["state_dict"]["comer_model.decoder.model.arm.conv.weight"])


def test_missing_key_is_named():
    _, state = small_state()
    del state["decoder.model.layers.1.norm2.bias"]
    with pytest.raises(CheckpointError, match=r"missing key 'decoder\.model\.layers\.1\.norm2\.bias'.*\(32,\)"):
        load_comer(state)


def test_unexpected_key_is_named():
    _, state = small_state()
    state["decoder.model.layers.0.extra"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected key 'decoder\.model\.layers\.0\.extra'"):
        load_comer(state)


def test_wrong_shape_is_named():
    _, state = small_state()
    state["decoder.model.arm.conv.bias"] = torch.zeros(9)
    with pytest.raises(CheckpointError, match=r"'decoder\.model\.arm\.conv\.bias': expected shape \(8,\), got \(9,\)"):
        load_comer(state)


def test_mixed_prefix_is_rejected():
    _, state = small_state()
    state = {("comer_model." + k if i else k): v for i, (k, v) in enumerate(state.items())}
    with pytest.raises(CheckpointError, match="unexpected key 'encoder.model.conv1.weight'"):
        load_comer(state)


@pytest.mark.parametrize("bad", [{}, {"state_dict": [1, 2]}, {"encoder.norm.weight": "x"}])
def test_not_a_checkpoint(bad):
    with pytest.raises(CheckpointError):
        load_comer(bad)


def test_unreadable_file(tmp_path):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_comer(path)


def test_unknown_config_override():
    _, state = small_state()
    with pytest.raises(ValueError, match="unknown config entries"):
        load_comer(state, config={"d_modle": 32})


# --- CoMER's published format, the restricted unpickler, and clear errors (issue 13) ---

from support.lightning_checkpoint import RunsCode, save_lightning_checkpoint  # noqa: E402

PUBLISHED_HPARAMS = {**SMALL, "cross_coverage": True, "self_coverage": True, "beam_size": 10, "max_len": 200,
                     "alpha": 1.0, "early_stopping": False, "temperature": 1.0, "learning_rate": 0.08, "patience": 20}


def test_published_lightning_format_loads_by_default(tmp_path):
    model, state = small_state()
    path = tmp_path / "epoch=151.ckpt"
    save_lightning_checkpoint(path, state, PUBLISHED_HPARAMS)
    import sys
    assert "pytorch_lightning" not in sys.modules  # loading does not need Lightning
    loaded = load_comer(path)
    assert loaded.config == model.config
    assert_same_state(loaded, state)
    with open(path, "rb") as file:  # a file object too
        assert load_comer(file).config == model.config


def test_code_in_a_checkpoint_never_runs(tmp_path):
    _, state = small_state()
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"d_model": RunsCode(marker)}}, path)
    with pytest.raises(CheckpointError, match=r"names posix\.system|names os\.system") as err:
        load_comer(path)
    assert "weights_only=False" in str(err.value)
    assert not marker.exists()


def test_missing_file_message_fits(tmp_path):
    with pytest.raises(CheckpointError, match="no such file") as err:
        load_comer(tmp_path / "absent.ckpt")
    assert "weights_only" not in str(err.value)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_comer(tmp_path)


def test_unreadable_file_message_fits(tmp_path):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="not a torch checkpoint") as err:
        load_comer(path)
    assert "weights_only" not in str(err.value) and len(str(err.value)) < 400


@pytest.mark.parametrize("source, match", [(b"x" * 20_000_000, "bytes of 20000000 bytes.*io.BytesIO"),
                                           ([1, 2], "source must be .* got list"), (None, "got NoneType")])
def test_bad_source_types(source, match):
    with pytest.raises(TypeError, match=match) as err:
        load_comer(source)
    assert len(str(err.value)) < 300
    assert err.value.__context__ is None  # raised by the check, not inside an error handler


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_weights_are_refused(dtype):
    _, state = small_state()
    state["decoder.proj.weight"] = state["decoder.proj.weight"].to(dtype)
    with pytest.raises(CheckpointError, match=rf"'decoder\.proj\.weight': expected a floating tensor, got {dtype}"):
        load_comer(state)


def test_partial_hyper_parameters_are_completed_from_shapes():
    model, state = small_state()
    raw = {"state_dict": state, "hyper_parameters": {"dropout": 0.1, "beam_size": 10}}
    assert load_comer(raw).config == model.config  # not the published d_model 256, ...


@pytest.mark.parametrize("config, match", [({"dropout": "x"}, r"config\['dropout'\]: expected a number"),
                                           ({"dropout": 1.5}, r"config\['dropout'\]"),
                                           ({"cross_coverage": 1}, r"config\['cross_coverage'\]: expected a bool"),
                                           ({"nhead": 2.0}, r"config\['nhead'\]: expected a positive int")])
def test_bad_config_values(config, match):
    _, state = small_state()
    with pytest.raises(ValueError, match=match):
        load_comer(state, config=config)


def test_bad_hyper_parameter_values():
    _, state = small_state()
    with pytest.raises(CheckpointError, match=r"hyper_parameters\['dropout'\]"):
        load_comer({"state_dict": state, "hyper_parameters": {"dropout": "x"}})
    with pytest.raises(TypeError, match="config must be a mapping"):
        load_comer(state, config=[("dropout", 0.1)])
