"""Issue 13, one test (or parametrized row) per item: a valid input gives the reference's
answer, an invalid one one clear ValueError/TypeError naming the argument, raised before any
work, the same from the engine and the reference; caches never serve stale weights; kept slots
are never shared by two searches; the command line gives usage errors.

Checkpoints (the issue's "Checkpoints" item) are covered by tests/test_checkpoint.py."""
import ast
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from fastcomer import beam_search, decode_images, greedy_search, reference_beam_search
from fastcomer.cli import main
from fastcomer.ops.cross_attention_step import cross_attention_step
from fastcomer.ops.cross_attention_step.launch import PreparedARMWeights, refresh_prepared_weights
from fastcomer.search.kept_slots import kept_slots, slots_lease
from fastcomer.search.options import SearchOptions
from fastcomer.search.search_slots import FeatureLayout
from fastcomer.ops.dispatch import DispatchPlan

from support.cross_attention_step_cases import make_step
from support.paths import REPO
from support.random_models import random_images, random_model
from support.search_cases import assert_same_search

SETTINGS = dict(beam_size=3, max_len=10)
SEARCHES = {
    "engine": lambda model, img, mask, **kw: beam_search(model, img, mask, **kw),
    "greedy": lambda model, img, mask, beam_size=1, **kw: greedy_search(model, img, mask, **kw),
    "reference": lambda model, img, mask, **kw: reference_beam_search(model, img, mask, **kw),
}


@pytest.fixture(scope="module")
def case():
    model = random_model(3)
    img, mask = random_images(3, [(32, 48), (20, 32)])
    return model, img, mask


def same_error(error, model, img, mask, **kwargs):
    """Every search raises `error` with one message for these arguments (greedy search, which
    has no beam, where the error is not the beam's)."""
    messages = set()
    for name, search in SEARCHES.items():
        if name == "greedy" and kwargs.get("beam_size") != SETTINGS["beam_size"]:
            continue
        with pytest.raises(error) as raised:
            search(model, img, mask, **kwargs)
        messages.add(str(raised.value))
    assert len(messages) == 1, messages
    return messages.pop()


# --- Stale weights -------------------------------------------------------------------------

def edit_through_data(model):
    """Change the ARM's weights and BatchNorm statistics in place through .data, which
    leaves the version counters where they were."""
    arm = model.decoder.model.arm
    arm.conv.weight.data.mul_(-2.0)
    arm.post_norm.bn.running_mean.data.add_(0.5)


@pytest.mark.parametrize("edit", ["data_edit", "reload_into_inference_tensors"])
def test_stale_weights(graph_policy, edit):
    """After an in-place edit through .data, or a reload into parameters that are inference
    tensors, the next search (on the slots kept from the first) answers as the reference with
    the new weights, not as before."""
    img, mask = random_images(5, [(32, 48)])
    with torch.inference_mode(edit == "reload_into_inference_tensors"):
        model = random_model(7)
        old = beam_search(model, img, mask, **SETTINGS, return_details=True)
        before = dict(kept_slots(model.decoder))
        if edit == "data_edit":
            edit_through_data(model)
        else:
            edited = random_model(7)
            edit_through_data(edited)
            model.load_state_dict(edited.state_dict())
        out = beam_search(model, img, mask, **SETTINGS, return_details=True)
    assert before and all(kept_slots(model.decoder)[key] is slots for key, slots in before.items()), "slots not reused"
    assert_same_search(out, reference_beam_search(model, img, mask, **SETTINGS, return_details=True))
    assert not torch.equal(out.first_pass_scores, old.first_pass_scores), "the edit changed nothing: the test proves nothing"


def test_stale_weights_prepared_for_the_kernels():
    """The kernels' prepared weights, which the engine refreshes at the start of each search:
    prepared again from the current values, into the same tensors (CUDA graphs read them by
    address), after a change their version counters do not show."""
    prepared = PreparedARMWeights(lambda arm: (arm.conv_weight * 2, arm.shift + 1))
    arm = make_step(2, "both")["arm"]
    first = prepared(arm)
    addresses = [t.data_ptr() for t in first]
    arm.conv_weight.data.mul_(3.0)
    arm.shift.data.add_(1.0)
    refresh_prepared_weights(arm)
    again = prepared(arm)
    assert [t.data_ptr() for t in again] == addresses
    assert torch.equal(again[0], arm.conv_weight * 2) and torch.equal(again[1], arm.shift + 1)


# --- Garbage from bad inputs ---------------------------------------------------------------

def nan_pixel(img, mask):
    img = img.clone()
    img[1, 0, 3, 5] = float("nan")
    return img, mask, {}


def inf_pixel(img, mask):
    img = img.clone()
    img[0, 0, -1, -1] = float("inf")  # under padding: the encoder's convolutions still read it
    return img, mask, {}


def all_padding_mask(img, mask):
    mask = mask.clone()
    mask[1] = True
    return img, mask, {}


@pytest.mark.parametrize("bad, message", [
    (nan_pixel, "NaN or infinite"),
    (inf_pixel, "NaN or infinite"),
    (all_padding_mask, r"image\(s\) \[1\]"),
    (lambda img, mask: (img, mask, {"temperature": float("nan")}), "temperature must be finite"),
    (lambda img, mask: (img, mask, {"temperature": float("inf")}), "temperature must be finite"),
    (lambda img, mask: (img, mask, {"temperature": -1.0}), "temperature must be positive"),
    (lambda img, mask: (img, mask, {"alpha": float("nan")}), "alpha must be finite"),
], ids=["nan_pixel", "inf_pixel", "all_padding_mask", "nan_temperature", "inf_temperature", "negative_temperature",
        "nan_alpha"])
def test_garbage_from_bad_inputs(case, bad, message):
    model, img, mask = case
    img, mask, kwargs = bad(img, mask)
    assert re.search(message, same_error(ValueError, model, img, mask, **SETTINGS, **kwargs))


# --- The engine and the reference disagree on valid arguments -----------------------------

@pytest.mark.parametrize("alpha", [-1.0, -0.5, 0.0])
def test_negative_alpha(case, alpha):
    model, img, mask = case
    out = beam_search(model, img, mask, **SETTINGS, alpha=alpha, return_details=True)
    assert_same_search(out, reference_beam_search(model, img, mask, **SETTINGS, alpha=alpha, return_details=True))


def test_batch_of_zero_images(case):
    """Chosen: no images, no answers ([]), from every search; with details, empty lists."""
    model, img, mask = case
    empty, empty_mask = img[:0], mask[:0]
    for search in SEARCHES.values():
        assert search(model, empty, empty_mask, **SETTINGS) == []
    for search in (beam_search, reference_beam_search):
        details = search(model, empty, empty_mask, **SETTINGS, return_details=True)
        assert details.hyps == [] and details.first_pass_hyps == [] and details.first_pass_scores.numel() == 0
    assert decode_images(model, [], **SETTINGS) == []
    same_error(ValueError, model, empty, empty_mask, beam_size=3, max_len=1)  # arguments still checked


# --- Types ---------------------------------------------------------------------------------

@pytest.mark.parametrize("change, error, message", [
    (dict(beam_size=2.5), TypeError, "beam_size must be an int"),
    (dict(beam_size=True), TypeError, "beam_size must be an int"),
    (dict(max_len=10.0), TypeError, "max_len must be an int"),
    (dict(temperature="1"), TypeError, "temperature must be a real number"),
    (dict(img=lambda img, mask: img.numpy()), TypeError, "img must be a torch.Tensor"),
    (dict(img_mask=lambda img, mask: None), TypeError, "img_mask must be a torch.Tensor"),
    (dict(img=lambda img, mask: (img * 255).to(torch.uint8)), TypeError, "img must have the model's dtype"),
    (dict(img=lambda img, mask: img.float()), TypeError, "img must have the model's dtype"),
    (dict(img_mask=lambda img, mask: mask.float()), TypeError, "img_mask must be a bool tensor"),
], ids=["float_beam_size", "bool_beam_size", "float_max_len", "str_temperature", "numpy_image", "img_mask_none",
        "uint8_image", "float32_image_into_float64_model", "float_mask"])
def test_types(case, change, error, message):
    """Chosen: ints for beam_size and max_len (bools rejected); img a tensor of the model's
    dtype (no silent conversion: an integer image's scale is unknown); img_mask a bool tensor,
    never None. decode_images, for lists of images, converts floating images (test below)."""
    model, img, mask = case
    img_arg = change.pop("img", lambda img, mask: img)(img, mask)
    mask_arg = change.pop("img_mask", lambda img, mask: mask)(img, mask)
    assert message in same_error(error, model, img_arg, mask_arg, **{**SETTINGS, **change})


def test_types_in_decode_images(case):
    """decode_images converts floating images to the model's dtype (answers as for the converted
    images) and rejects others, naming the image."""
    model, img, _ = case
    image = img[0, :, :32, :48]
    (answer,) = decode_images(model, [image.float()], **SETTINGS)
    (expected,) = reference_beam_search(model, image.float().double()[None], torch.zeros(1, 32, 48, dtype=torch.bool),
                                        **SETTINGS)
    assert answer.seq == expected.seq and answer.score == pytest.approx(expected.score, rel=1e-12)
    with pytest.raises(TypeError, match="image 1: expected a floating-point torch.Tensor, got ndarray"):
        decode_images(model, [image, image.numpy()], **SETTINGS)
    with pytest.raises(TypeError, match="image 0: .* got a torch.uint8 tensor"):
        decode_images(model, [image.to(torch.uint8)], **SETTINGS)
    with pytest.raises(ValueError, match="image 1 holds NaN"):
        decode_images(model, [image, image * float("nan")], **SETTINGS)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        decode_images(model, [image], batch_size=1.5, **SETTINGS)


# --- The fused decode step trusts its indices ----------------------------------------------

@pytest.mark.parametrize("index", [3, 100])
def test_cross_attention_step_validates_image_index(index):
    step = make_step(2, "both", image_index=(2, 0, 1, -1))  # 3 images
    step["image_index"][2] = index
    with pytest.raises(ValueError, match="image_index must be < 3"):
        cross_attention_step(**step, backend="torch")


def test_cross_attention_step_index_check_has_no_host_sync():
    """Off the CPU the index check is a device-side assert: on the meta device, where any read
    of a value on the host raises, the step's check passes through."""
    step = make_step(2, "both", device="meta")
    from fastcomer.ops.cross_attention_step import check_image_index

    check_image_index(step["image_index"], 3)


# --- Concurrency ---------------------------------------------------------------------------

def test_kept_slots_are_never_shared(graph_policy):
    """A search checks kept slots out: one running beside it builds its own; both check theirs
    back in when they end (one set kept per settings), and the next search reuses them."""
    model = random_model(2)
    lease = (model.decoder, SearchOptions(**SETTINGS), FeatureLayout(2, 3, torch.float64, torch.device("cpu"),
                                                                     DispatchPlan.of("torch", torch.float64, True)))
    with torch.inference_mode():
        with slots_lease(*lease) as first:
            mine = first(2)
            with slots_lease(*lease) as second:
                theirs = second(2)
                assert theirs is not mine
            assert list(kept_slots(model.decoder).values()) == [theirs]
        assert list(kept_slots(model.decoder).values()) == [mine]
        with slots_lease(*lease) as third:
            assert third(2) is mine and not kept_slots(model.decoder)


def test_concurrency(graph_policy):
    """Two threads search one model at once through the graph policy (kept slots): both get
    the reference's answers."""
    model = random_model(5)
    cases = [random_images(seed, [(32, 48), (48, 32)]) for seed in (1, 2)]
    expected = [reference_beam_search(model, img, mask, **SETTINGS, return_details=True) for img, mask in cases]
    start, results = threading.Barrier(2), [None, None]

    def search(i):
        start.wait()
        for _ in range(2):
            results[i] = beam_search(model, *cases[i], **SETTINGS, return_details=True)

    threads = [threading.Thread(target=search, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for out, ref in zip(results, expected):
        assert_same_search(out, ref)


# --- Checkpoints: tests/test_checkpoint.py (owned by the checkpoint work) ---------------------

# --- Command line --------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--images", "0"], ["--images", "-1"], ["--batch", "0"], ["--beam-size", "0"], ["--max-len", "-5"],
    ["--threads", "0"], ["--shape", "0x0"], ["--shape", "12x"], ["--device", "gpu"], ["--device", "cuda:99"],
    ["--out", "{file}/report.json"],
], ids=lambda argv: " ".join(argv))
def test_command_line(tmp_path, capsys, monkeypatch, argv):
    """A usage error (exit status 2) before any work: the benchmark never starts."""
    import fastcomer.benchmarking as benchmarking

    monkeypatch.setattr(benchmarking, "bench_model", lambda *a, **k: pytest.fail("the benchmark ran"))
    monkeypatch.setattr(benchmarking, "engine_row", lambda *a, **k: pytest.fail("the benchmark ran"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exited:
        main(["bench", *(a.format(file=blocker) for a in argv)])
    assert exited.value.code == 2
    assert "usage: fastcomer bench" in capsys.readouterr().err


def test_command_line_golden_is_gone():
    """`fastcomer golden` (which loaded a file with weights_only=False) no longer exists, and
    every torch.load in fastcomer either runs the restricted unpickler (`pickle_module=`) or is
    load_comer's path for a caller's explicit weights_only=False (a file the caller trusts)."""
    result = subprocess.run([sys.executable, "-m", "fastcomer", "golden", "--golden", "x.pt"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr and "Traceback" not in result.stderr
    unrestricted = []
    for path in sorted((Path(REPO) / "fastcomer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                keywords = {keyword.arg: keyword.value for keyword in node.keywords}
                weights_only = keywords.get("weights_only")
                unsafe = not (isinstance(weights_only, ast.Constant) and weights_only.value is True)
                if unsafe and "pickle_module" not in keywords:
                    unrestricted.append(path.relative_to(REPO).as_posix())
    assert unrestricted == ["fastcomer/checkpoint.py"]  # the opt-in, tested in tests/test_checkpoint.py
