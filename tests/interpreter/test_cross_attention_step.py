"""The Triton decode step (through Triton's interpreter, on CPU) against the reference
`fastcomer.ops.cross_attention_step.cross_attention_step`."""
import os

import pytest
import torch

from support.asserts import assert_close_rel
from support.cross_attention_step_cases import COVERAGE_MODES, check_against_torch, check_chain, clone, make_chain, make_step
from fastcomer.ops.cross_attention_step.reference import grouped_cross_attention_step
from fastcomer.ops.cross_attention_step import cross_attention_step

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (tests/run.sh does it)", allow_module_level=True)

# nhead 8 "cross" is test_int64_image_index_and_strided_kv's step (the same inputs, K/V strided)
@pytest.mark.parametrize("nhead, mode", [(2, "cross"), (2, "self"), (2, "both"), (8, "self"), (8, "both")])
def test_triton_matches_reference(nhead, mode):
    check_against_torch(make_step(nhead, mode), "triton")


@pytest.mark.parametrize("nhead", [2, 8])
def test_triton_layer0_matches_reference(nhead):
    """Layer 0 (no coverage): the ARM's coverage mode is not read (CoverageFlags all False),
    so one mode stands for the three."""
    check_against_torch(make_step(nhead, "both", refine=False), "triton")


@pytest.mark.parametrize("mode", list(COVERAGE_MODES))
def test_triton_chained_layers_and_steps(mode):
    """Three layers over three steps, each layer's coverage a slice of one all-layers tensor:
    the coverage each layer refines with holds only the earlier steps (steps 1 and 2 refine
    with non-zero sums; the torch and CUDA-emulation chains run the default four)."""
    check_chain(make_chain(2, mode, steps=3), lambda *args: cross_attention_step(*args, backend="triton"))


def test_strided_image_index():
    """image_index a column of a wider tensor (stride 2): each row reads its own entry."""
    step = make_step(2, "both")
    expected_step, actual_step = clone(step), clone(step)  # clone() would make the index contiguous: after it
    index = step["image_index"]
    actual_step["image_index"] = torch.stack([index, torch.full_like(index, -1)], 1)[:, 0]
    assert actual_step["image_index"].stride(0) == 2
    expected, expected_returned = cross_attention_step(**expected_step, backend="torch")
    actual, returned = cross_attention_step(**actual_step, backend="triton")
    assert_close_rel(actual, expected, 1e-5, "A'V")
    assert_close_rel(returned, expected_returned, 1e-5, "returned")
    assert_close_rel(actual_step["coverage"], expected_step["coverage"], 1e-5, "coverage")


def test_torch_path_is_the_reference_on_grouped_rows():
    """The flat-row torch path equals grouped_cross_attention_step on rows grouped [I, G]."""
    step = make_step(8, "both", image_index=(0, 0, 1, 1, 2, 2))
    grouped = clone(step)
    flat_step = clone(step)
    flat, flat_returned = cross_attention_step(**flat_step, backend="torch")
    images, nhead, L, head_dim = step["k"].shape
    expected, expected_returned = grouped_cross_attention_step(
        grouped["q"].view(images, 2, nhead, head_dim), grouped["k"], grouped["v"], grouped["key_padding_mask"],
        grouped["height"], grouped["arm"], grouped["coverage"], grouped["prev_attn"],
    )
    assert_close_rel(flat, expected.reshape(-1, nhead, head_dim), 1e-6, "A'V")
    assert_close_rel(flat_returned, expected_returned, 1e-6, "returned")
    assert_close_rel(flat_step["coverage"], grouped["coverage"], 1e-6, "coverage")


@pytest.mark.parametrize("image_index", [(0, 0, 1, 1, 2, 2), (0, -1, -1, -1, -1, 2)], ids=["all", "skipped"])
def test_rows_per_image_share_the_slot(image_index):
    """rows_per_image = 2: each image's 2 rows are one slot of the partial attention (one K/V
    read for them), L split across 3 programs; skipped rows (one, or a whole slot) give 0
    and keep their coverage."""
    step = make_step(2, "both", image_index=image_index, height=6, width=7)
    expected_step, actual_step = clone(step), clone(step)
    expected, expected_returned = cross_attention_step(**expected_step, backend="torch")
    actual, returned = cross_attention_step(**actual_step, backend="triton", rows_per_image=2)
    assert_close_rel(actual, expected, 1e-5, "A'V")
    assert_close_rel(returned, expected_returned, 1e-5, "returned")
    assert_close_rel(actual_step["coverage"], expected_step["coverage"], 1e-5, "coverage")
    skipped = torch.tensor(image_index) < 0
    assert torch.equal(actual_step["coverage"][skipped], step["coverage"][skipped])
    assert not actual[skipped].any() and not returned[skipped].any()


def test_rows_per_image_is_checked():
    step = make_step(2, "both", image_index=(0, 0, 1, 2, 2, 1))
    with pytest.raises(ValueError, match="row r must read image r // rows_per_image"):
        cross_attention_step(**step, backend="triton", rows_per_image=2)
    with pytest.raises(ValueError, match="6 rows are not 3 images x rows_per_image=3"):
        cross_attention_step(**step, backend="triton", rows_per_image=3)


def test_odd_sizes_and_several_tiles():
    """h, w odd with L spanning several tiles (and a ragged last one); head_dim not a power of two."""
    check_against_torch(make_step(8, "both", height=9, width=11, head_dim=12, seed=1), "triton")


def test_inactive_rows_are_untouched():
    step = make_step(2, "both", image_index=(1, -1, 0, -1, 2))
    inactive = torch.tensor([1, 3])
    before = clone(step)
    out, returned = cross_attention_step(**step, backend="triton")
    assert torch.equal(out[inactive], torch.zeros_like(out[inactive]))
    assert torch.equal(returned[inactive], torch.zeros_like(returned[inactive]))
    assert torch.equal(step["coverage"][inactive], before["coverage"][inactive])
    check_against_torch(before, "triton")


def test_int64_image_index_and_strided_kv():
    """K/V as views of a wider projection output (non-unit image/position strides)."""
    step = make_step(8, "cross")
    images, nhead, L, head_dim = step["k"].shape
    kv = torch.stack([step["k"], step["v"]], dim=3)  # [I, nhead, L, 2, hd]
    step.update(k=kv[:, :, :, 0], v=kv[:, :, :, 1], image_index=step["image_index"].long())
    check_against_torch(step, "triton")


def test_bad_inputs_raise_clearly():
    step = make_step(2, "both")
    with pytest.raises(ValueError, match="image_index must be int32/int64"):
        cross_attention_step(**{**step, "image_index": step["image_index"].float()}, backend="triton")
    with pytest.raises(ValueError, match="coverage must be"):
        cross_attention_step(**{**step, "coverage": step["coverage"][:, :2]}, backend="triton")
    with pytest.raises(ValueError, match="height 4 does not divide"):
        cross_attention_step(**{**step, "height": 4}, backend="triton")
    with pytest.raises(ValueError, match="prev_attn .* is needed"):
        cross_attention_step(**{**step, "prev_attn": None}, backend="triton")


@pytest.mark.parametrize("changed", ["conv_weight", "shift"])
def test_padded_weights_are_prepared_once_per_arm(monkeypatch, changed):
    """The kernel's zero-padded ARM weights are prepared on the first call and the same tensors
    (a CUDA graph of the step needs them at fixed addresses) reused on later calls; changing a
    weight in place (the key conv_weight or another) prepares them again."""
    from fastcomer.ops.cross_attention_step import triton_kernel as cross_attention_triton

    launches = []  # the (conv_weight, conv_bias, proj_weight, shift) each launch read
    kernel = cross_attention_triton._refinement_kernel

    class RecordingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(args[3:7])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(cross_attention_triton, "_refinement_kernel", RecordingKernel())
    step = make_step(2, "both")
    check_against_torch(step, "triton")
    check_against_torch(step, "triton")
    first, second = launches
    assert all(a is b and a.data_ptr() == b.data_ptr() for a, b in zip(first, second))
    with torch.no_grad():
        getattr(step["arm"], changed).mul_(-1.5)
    check_against_torch(step, "triton")
    assert all(a is not b for a, b in zip(second, launches[2]))
