"""Backend choice and input checks of the fused cross-attention step, and the environment report (CPU)."""
import gc
import json
import subprocess
import sys
import weakref
from types import SimpleNamespace

import pytest
import torch

from support.markers import requires_gpu
from support.paths import REPO
from support.cross_attention_step_cases import COVERAGE_MODES, check_against_torch, check_chain, clone, make_chain, make_step
from fastcomer import env_report
from fastcomer.backends import cuda_extension_status
from fastcomer.ops.cross_attention_step.cuda_kernel import _float32_weights, unsupported_inputs, unsupported_reason
from fastcomer.ops.cross_attention_step import cross_attention_step
from fastcomer.ops.cross_attention_step.inputs import check_inputs
from fastcomer.ops.cross_attention_step.launch import PreparedARMWeights


def test_auto_runs_cpu_tensors_on_torch(monkeypatch):
    monkeypatch.delenv("FASTCOMER_BACKEND", raising=False)
    step = make_step(2, "both")
    expected_step, auto_step = clone(step), clone(step)
    expected, expected_returned = cross_attention_step(**expected_step, backend="torch")
    out, returned = cross_attention_step(**auto_step)
    assert torch.equal(out, expected) and torch.equal(returned, expected_returned)
    assert returned.dtype == torch.float32
    assert torch.equal(auto_step["coverage"], expected_step["coverage"])


@pytest.mark.parametrize("mode", list(COVERAGE_MODES))
def test_chained_layers_and_steps(mode):
    """Three layers over four steps through the dispatcher (rows of different images, unsorted,
    one inactive; each layer's coverage a slice of one all-layers tensor) against the reference
    chained on rows grouped by image: a layer must see only the earlier steps in its coverage."""
    check_chain(make_chain(4, mode), lambda *args: cross_attention_step(*args, backend="torch"), rtol=1e-6)


def test_inactive_rows_on_torch():
    step = make_step(2, "both", image_index=(1, -1, 0, -1, 2))
    before = clone(step)
    out, returned = cross_attention_step(**step, backend="torch")
    assert torch.equal(out[[1, 3]], torch.zeros_like(out[[1, 3]]))
    assert torch.equal(returned[[1, 3]], torch.zeros_like(returned[[1, 3]]))
    assert torch.equal(step["coverage"][[1, 3]], before["coverage"][[1, 3]])


def test_forcing_a_backend_that_cannot_run_raises(monkeypatch):
    step = make_step(2, "both")
    with pytest.raises(RuntimeError, match="backend 'cuda' was forced"):
        cross_attention_step(**step, backend="cuda")
    monkeypatch.setenv("FASTCOMER_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' was forced"):
        cross_attention_step(**step)
    with pytest.raises(ValueError, match="must be one of"):
        cross_attention_step(**step, backend="cudnn")


def test_float64_runs_on_torch_under_auto_only():
    step = make_step(2, "cross")
    step.update({name: step[name].double() for name in ("q", "k", "v")})
    out, returned = cross_attention_step(**step, backend="auto")
    assert out.dtype == returned.dtype == torch.float64
    with pytest.raises(ValueError, match=r"backend 'triton' \(cross_attention_step\) runs"):
        cross_attention_step(**step, backend="triton")


def test_unsupported_shapes_for_the_cuda_build_are_named(monkeypatch):
    """The limits are the build's own (_C.LIMITS), here those of a stand-in module."""
    from fastcomer.ops.cross_attention_step import cuda_kernel

    limits = dict(kernel_size=5, threads=128, max_heads=16, dc=32, max_head_dim=128, tile=16, max_tile=128, stats=4)
    monkeypatch.setattr(cuda_kernel, "cuda_extension_status", lambda: (SimpleNamespace(LIMITS=limits), "ok"))
    step = make_step(2, "both")
    shape = check_inputs(**step)
    assert unsupported_inputs(shape, step["q"], step["coverage"], step["prev_attn"]) is None
    assert "nhead 17" in unsupported_inputs(shape._replace(nhead=17), step["q"], None, None)  # any nhead <= 16 runs
    assert "head_dim 256" in unsupported_inputs(shape._replace(head_dim=256), step["q"], None, None)
    assert "dc 64" in unsupported_inputs(shape._replace(dc=64), step["q"], None, None)
    assert "float64" in unsupported_inputs(shape, step["q"].double(), None, None)
    assert "coverage in torch.float16" in unsupported_inputs(shape, step["q"], step["coverage"].half(), None)
    assert "prev_attn in torch.float64" in unsupported_inputs(shape, step["q"], None, step["prev_attn"].double())
    assert unsupported_reason(8, 32, 0, torch.bfloat16) is None  # no ARM
    limits["max_tile"] = 64  # a build whose tiles are not fastcomer's
    assert "rebuild the extension" in unsupported_reason(8, 32, 32, torch.float32)
    monkeypatch.setattr(cuda_kernel, "cuda_extension_status", lambda: (None, "fastcomer._C is not built"))
    assert unsupported_reason(8, 32, 32, torch.float32) == "fastcomer._C is not built"


def test_inputs_are_checked_with_clear_messages():
    step = make_step(2, "both")
    cases = [
        (dict(q=step["q"][0]), "q must be"),
        (dict(k=step["k"][:, :1]), "k must be"),
        (dict(v=step["v"][:, :, :3]), "v must have k's shape"),
        (dict(q=step["q"].double()), "share a dtype"),
        (dict(key_padding_mask=step["key_padding_mask"].int()), "key_padding_mask must be bool"),
        (dict(arm=None), "without the ARM"),
        (dict(coverage=step["coverage"].transpose(1, 2).contiguous().transpose(1, 2)), "contiguous within each row"),
        (dict(coverage=step["coverage"][:1].expand(step["q"].shape[0], -1, -1)), "rows not overlapping"),
        (dict(coverage=step["coverage"][:, :2]), "coverage must be"),
        (dict(prev_attn=None), r"prev_attn \(the previous layer's returned attention\) is needed"),
        (dict(prev_attn=step["prev_attn"][:, :1]), "prev_attn must be"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            cross_attention_step(**{**step, **change}, backend="torch")


def test_env_report_and_command():
    report = env_report()
    assert report["torch"] == torch.__version__
    assert set(report["backends"]) == {"cuda", "triton", "torch"} and report["backends"]["torch"] == "ok"
    result = subprocess.run([sys.executable, "-m", "fastcomer", "env", "--json"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["backends"]["torch"] == "ok"


def test_prepared_arm_weights_follow_the_weights():
    """Prepared once per folded ARM; prepared again after an in-place change or a refold (new
    projection tensors beside the same conv_weight); let go of with the weights; inference
    tensors (the engine folds under inference mode), which track no version, are reused."""
    calls = []

    def prepare(arm):
        calls.append(arm)
        return (arm.conv_weight * 2,)

    prepared = PreparedARMWeights(prepare)
    arm = make_step(2, "both")["arm"]
    first = prepared(arm)
    assert prepared(arm) is first and len(calls) == 1
    with torch.no_grad():
        arm.conv_bias.add_(1.0)
    assert prepared(arm) is not first and len(calls) == 2
    refolded = arm._replace(proj_weight=arm.proj_weight.clone())
    assert prepared(refolded) is not prepared(arm) and len(calls) == 4
    with torch.inference_mode():
        inference_arm = arm._replace(proj_weight=arm.proj_weight.clone(), shift=arm.shift.clone())
    assert prepared(inference_arm) is prepared(inference_arm) and len(calls) == 5
    released = weakref.ref(prepared(arm)[0])
    del arm, refolded, inference_arm, calls[:]
    gc.collect()
    assert released() is None


def test_cuda_weights_are_float32_copies():
    """The CUDA kernel's weights: contiguous float32, never the model's own tensors (the cache
    would keep them alive), prepared once."""
    arm = make_step(2, "both")["arm"]
    half = arm._replace(**{name: getattr(arm, name).half() for name in ("conv_weight", "conv_bias", "proj_weight", "shift")})
    for folded in (arm, half):
        weights = _float32_weights(folded)
        assert _float32_weights(folded) is weights
        originals = (folded.conv_weight, folded.conv_bias, folded.proj_weight, folded.shift)
        for w, original in zip(weights, originals):
            assert w.dtype == torch.float32 and w.is_contiguous() and w.data_ptr() != original.data_ptr()
            assert torch.equal(w, original.float())

def require(backend):
    if backend == "cuda" and cuda_extension_status()[0] is None:
        pytest.skip(cuda_extension_status()[1])


@requires_gpu
@pytest.mark.parametrize("refine", [False, True], ids=["layer0", "refining"])
@pytest.mark.parametrize("mode", list(COVERAGE_MODES))
@pytest.mark.parametrize("nhead", [2, 8])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_matches_reference_on_gpu(backend, nhead, mode, refine):
    require(backend)
    check_against_torch(make_step(nhead, mode, refine, device="cuda"), backend)


@requires_gpu
@pytest.mark.parametrize("mode", list(COVERAGE_MODES))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_chained_layers_and_steps_on_gpu(backend, mode):
    """Three layers over four steps, coverage slices of one all-layers tensor (row-strided)."""
    require(backend)
    check_chain(make_chain(8, mode, height=9, width=11, head_dim=32, device="cuda"),
                lambda *args: cross_attention_step(*args, backend=backend))


@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("height,width,head_dim", [(9, 11, 12), (12, 37, 32), (16, 64, 32), (3, 171, 64)])
def test_several_tiles_on_gpu(backend, height, width, head_dim):
    """L spanning several tiles of either kernel (ragged last tile, halos across tiles)."""
    require(backend)
    image_index = (3, 0, 2, 2, 1, 0, 3, 1)
    check_against_torch(make_step(8, "both", True, height, width, head_dim, images=4, image_index=image_index,
                                  device="cuda"), backend)


@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_inactive_rows_are_untouched_on_gpu(backend):
    require(backend)
    step = make_step(8, "both", image_index=(1, -1, 0, -1, 2), device="cuda")
    before = clone(step)
    out, returned = cross_attention_step(**step, backend=backend)
    assert torch.equal(out[[1, 3]], torch.zeros_like(out[[1, 3]]))
    assert torch.equal(returned[[1, 3]], torch.zeros_like(returned[[1, 3]]))
    assert torch.equal(step["coverage"][[1, 3]], before["coverage"][[1, 3]])
    check_against_torch(before, backend)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_half_precision_inputs_on_gpu(backend, dtype):
    """q, k, v in half precision, coverage sums in float32: close to the float32 reference."""
    require(backend)
    step = make_step(8, "both", height=9, width=11, head_dim=32, device="cuda")
    half = {**clone(step), **{name: step[name].to(dtype) for name in ("q", "k", "v")}}
    reference = {**clone(step), **{name: half[name].float() for name in ("q", "k", "v")}}
    expected, expected_returned = cross_attention_step(**reference, backend="torch")
    actual, returned = cross_attention_step(**half, backend=backend)
    assert actual.dtype == dtype and returned.dtype == torch.float32
    torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(returned, expected_returned, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(half["coverage"], reference["coverage"], rtol=1e-4, atol=1e-4)
