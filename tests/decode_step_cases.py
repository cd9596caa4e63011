"""Random decode-step inputs shared by the Triton (interpreter) and GPU tests of the fused step."""
import torch

from conftest import assert_close_rel
from fastcomer.model.arm import AttentionRefinementModule
from fastcomer.ops.decode_step_dispatch import fused_cross_attention_step

COVERAGE_MODES = {"cross": (True, False), "self": (False, True), "both": (True, True)}


def make_arm(nhead, cross, self_, generator):
    arm = AttentionRefinementModule(nhead, 32, cross, self_)
    with torch.no_grad():
        for p in arm.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        bn = arm.post_norm.bn
        bn.running_mean.copy_(torch.randn(nhead, generator=generator))
        bn.running_var.copy_(torch.rand(nhead, generator=generator) + 0.5)
        return arm.eval().fold()


def make_step(nhead, mode, layer, height=5, width=7, head_dim=8, images=3, image_index=(2, 0, 2, 1, 0, 2), seed=0,
              device="cpu"):
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
    step = dict(
        q=torch.randn(rows, nhead, head_dim, generator=g),
        k=torch.randn(images, nhead, L, head_dim, generator=g) * 1.5,
        v=torch.randn(images, nhead, L, head_dim, generator=g),
        key_padding_mask=mask,
        image_index=torch.tensor(image_index, dtype=torch.int32),
        height=height,
        arm=arm._replace(**{name: getattr(arm, name).to(device) for name in ("conv_weight", "conv_bias", "proj_weight", "shift")}),
        coverage=coverage,
        next_coverage=next_coverage,
    )
    return {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in step.items()}


def clone(step):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in step.items()}


def check_against_torch(step, backend, rtol=1e-5):
    expected_step, actual_step = clone(step), clone(step)
    expected = fused_cross_attention_step(**expected_step, backend="torch")
    actual = fused_cross_attention_step(**actual_step, backend=backend)
    assert_close_rel(actual, expected, rtol, "A'V")
    for name in ("coverage", "next_coverage"):
        if step[name] is not None:
            assert_close_rel(actual_step[name], expected_step[name], rtol, name)
