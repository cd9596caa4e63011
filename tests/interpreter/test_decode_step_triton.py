"""The Triton decode step (through Triton's interpreter, on CPU) against the reference
`fastcomer.ops.decode_step.cross_attention_step`."""
import os

import pytest
import torch

from fastcomer.model.arm import AttentionRefinementModule
from fastcomer.ops.decode_step import cross_attention_step
from fastcomer.ops.decode_step_dispatch import fused_cross_attention_step

from conftest import assert_close_rel

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (tests/run.sh does it)", allow_module_level=True)

COVERAGE_MODES = {"cross": (True, False), "self": (False, True), "both": (True, True)}
RTOL = 1e-5


def make_arm(nhead, cross, self_, generator):
    arm = AttentionRefinementModule(nhead, 32, cross, self_)
    with torch.no_grad():
        for p in arm.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        bn = arm.post_norm.bn
        bn.running_mean.copy_(torch.randn(nhead, generator=generator))
        bn.running_var.copy_(torch.rand(nhead, generator=generator) + 0.5)
        return arm.eval().fold()


def make_step(nhead, mode, layer, height=5, width=7, head_dim=8, images=3, image_index=(2, 0, 2, 1, 0, 2), seed=0):
    """Inputs of one step: images of different valid sizes (padding at the bottom and right,
    plus scattered masked positions in one image), rows in no particular image order."""
    g = torch.Generator().manual_seed(seed)
    L = height * width
    rows = len(image_index)
    arm = make_arm(nhead, *COVERAGE_MODES[mode], g)
    channels = arm.conv_weight.shape[1]
    mask = torch.zeros(images, height, width, dtype=torch.bool)
    mask[0, height - 2:] = True  # two whole rows
    mask[1, :, width - 3:] = True  # three whole columns
    mask = mask.view(images, L)
    mask[2, torch.randperm(L, generator=g)[: L // 4]] = True  # scattered
    coverage = None if layer == "first" else torch.rand(rows, channels, L, generator=g) * 3
    next_coverage = None if layer == "last" else torch.rand(rows, channels, L, generator=g) * 3
    return dict(
        q=torch.randn(rows, nhead, head_dim, generator=g),
        k=torch.randn(images, nhead, L, head_dim, generator=g) * 1.5,
        v=torch.randn(images, nhead, L, head_dim, generator=g),
        key_padding_mask=mask,
        image_index=torch.tensor(image_index, dtype=torch.int32),
        height=height,
        arm=arm,
        coverage=coverage,
        next_coverage=next_coverage,
    )


def clone(step):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in step.items()}


def check_against_torch(step):
    expected_step, actual_step = clone(step), clone(step)
    expected = fused_cross_attention_step(**expected_step, backend="torch")
    actual = fused_cross_attention_step(**actual_step, backend="triton")
    assert_close_rel(actual, expected, RTOL, "A'V")
    for name in ("coverage", "next_coverage"):
        if step[name] is not None:
            assert_close_rel(actual_step[name], expected_step[name], RTOL, name)


@pytest.mark.parametrize("layer", ["first", "middle", "last"])
@pytest.mark.parametrize("mode", list(COVERAGE_MODES))
@pytest.mark.parametrize("nhead", [2, 8])
def test_triton_matches_reference(nhead, mode, layer):
    check_against_torch(make_step(nhead, mode, layer))


def test_torch_path_is_the_reference_on_grouped_rows():
    """The flat-row torch path equals cross_attention_step on rows grouped [I, G]."""
    step = make_step(8, "both", "middle", image_index=(0, 0, 1, 1, 2, 2))
    grouped = clone(step)
    flat_step = clone(step)
    flat = fused_cross_attention_step(**flat_step, backend="torch")
    images, nhead, L, head_dim = step["k"].shape
    expected = cross_attention_step(
        grouped["q"].view(images, 2, nhead, head_dim), grouped["k"], grouped["v"], grouped["key_padding_mask"],
        grouped["height"], grouped["arm"], grouped["coverage"], grouped["next_coverage"],
    )
    assert_close_rel(flat, expected.reshape(-1, nhead, head_dim), 1e-6, "A'V")
    for name in ("coverage", "next_coverage"):
        assert_close_rel(flat_step[name], grouped[name], 1e-6, name)


def test_odd_sizes_and_several_tiles():
    """h, w odd with L spanning several tiles (and a ragged last one); head_dim not a power of two."""
    check_against_torch(make_step(8, "both", "middle", height=9, width=11, head_dim=12, seed=1))


def test_inactive_rows_are_untouched():
    step = make_step(2, "both", "middle", image_index=(1, -1, 0, -1, 2))
    inactive = torch.tensor([1, 3])
    before = clone(step)
    out = fused_cross_attention_step(**step, backend="triton")
    assert torch.equal(out[inactive], torch.zeros_like(out[inactive]))
    for name in ("coverage", "next_coverage"):
        assert torch.equal(step[name][inactive], before[name][inactive])
    check_against_torch(before)


def test_int64_image_index_and_strided_kv():
    """K/V as views of a wider projection output (non-unit image/position strides)."""
    step = make_step(8, "cross", "middle")
    images, nhead, L, head_dim = step["k"].shape
    kv = torch.stack([step["k"], step["v"]], dim=3)  # [I, nhead, L, 2, hd]
    step.update(k=kv[:, :, :, 0], v=kv[:, :, :, 1], image_index=step["image_index"].long())
    check_against_torch(step)


def test_bad_inputs_raise_clearly():
    step = make_step(2, "both", "middle")
    with pytest.raises(ValueError, match="image_index must be int32/int64"):
        fused_cross_attention_step(**{**step, "image_index": step["image_index"].float()}, backend="triton")
    with pytest.raises(ValueError, match="coverage must be"):
        fused_cross_attention_step(**{**step, "coverage": step["coverage"][:, :2]}, backend="triton")
    with pytest.raises(ValueError, match="height 4 does not divide"):
        fused_cross_attention_step(**{**step, "height": 4}, backend="triton")
