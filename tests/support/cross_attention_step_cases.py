"""Random decode-step inputs shared by the tests of the fused step (torch, Triton interpreter,
CUDA emulation, GPU): single steps, and several layers chained over several steps."""
import torch

from support.asserts import assert_close_rel
from fastcomer.model.arm import AttentionRefinementModule
from fastcomer.ops.cross_attention_step.reference import grouped_cross_attention_step
from fastcomer.ops.cross_attention_step import cross_attention_step

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


def random_attention(rows, nhead, mask_rows, generator):
    """Softmax-like rows of positive weights summing to 1 over the unmasked positions."""
    a = torch.rand(rows, nhead, mask_rows.shape[1], generator=generator).masked_fill(mask_rows[:, None], 0.0)
    return a / a.sum(-1, keepdim=True)


def make_mask(images, height, width, generator):
    """Images of different valid sizes (padding at the bottom and right, plus scattered
    masked positions in one image)."""
    L = height * width
    mask = torch.zeros(images, height, width, dtype=torch.bool)
    mask[0, height - 2:] = True  # two whole rows
    mask[1, :, width - 3:] = True  # three whole columns
    mask = mask.view(images, L)
    mask[2, torch.randperm(L, generator=generator)[: L // 4]] = True  # scattered
    return mask


def make_step(nhead, mode, refine=True, height=5, width=7, head_dim=8, images=3, image_index=(2, 0, 2, 1, 0, 2), seed=0,
              device="cpu"):
    """Inputs of one layer's step (layer 0 unless `refine`), rows in no particular image order;
    inactive rows (negative index) read image 0's mask for their prev_attn."""
    g = torch.Generator().manual_seed(seed)
    L = height * width
    rows = len(image_index)
    arm = make_arm(nhead, *COVERAGE_MODES[mode], g)
    channels = arm.conv_weight.shape[1]
    mask = make_mask(images, height, width, g)
    coverage = torch.rand(rows, channels, L, generator=g) * 3 if refine else None
    prev_attn = random_attention(rows, nhead, mask[torch.tensor(image_index).clamp(min=0)], g) if refine else None
    step = dict(
        q=torch.randn(rows, nhead, head_dim, generator=g),
        k=torch.randn(images, nhead, L, head_dim, generator=g) * 1.5,
        v=torch.randn(images, nhead, L, head_dim, generator=g),
        key_padding_mask=mask,
        image_index=torch.tensor(image_index, dtype=torch.int32),
        height=height,
        arm=arm._replace(**{name: getattr(arm, name).to(device) for name in ("conv_weight", "conv_bias", "proj_weight", "shift")}),
        coverage=coverage,
        prev_attn=prev_attn,
    )
    return {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in step.items()}


def clone(step):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in step.items()}


def check_against_torch(step, backend, rtol=1e-5):
    expected_step, actual_step = clone(step), clone(step)
    expected, expected_returned = cross_attention_step(**expected_step, backend="torch")
    actual, returned = cross_attention_step(**actual_step, backend=backend)
    assert returned.dtype == torch.float32
    assert_close_rel(actual, expected, rtol, "A'V")
    assert_close_rel(returned, expected_returned, rtol, "returned")
    if step["coverage"] is not None:
        assert_close_rel(actual_step["coverage"], expected_step["coverage"], rtol, "coverage")


def make_chain(nhead, mode, layers=3, steps=4, height=5, width=7, head_dim=8, images=3,
               image_index=(2, 0, -1, 2, 1, 0, 1), seed=0, device="cpu"):
    """Inputs of a decoder's cross-attention over several steps: per layer K/V of every image,
    per step and layer the queries of every row (rows of different images, unsorted, one
    inactive); one ARM shared by the layers, zero coverage sums at the start."""
    g = torch.Generator().manual_seed(seed)
    L, rows = height * width, len(image_index)
    arm = make_arm(nhead, *COVERAGE_MODES[mode], g)
    chain = dict(
        q=torch.randn(steps, layers, rows, nhead, head_dim, generator=g),
        k=torch.randn(layers, images, nhead, L, head_dim, generator=g) * 1.5,
        v=torch.randn(layers, images, nhead, L, head_dim, generator=g),
        key_padding_mask=make_mask(images, height, width, g),
        image_index=torch.tensor(image_index, dtype=torch.int32),
        height=height,
        coverage=torch.zeros(rows, layers - 1, arm.conv_weight.shape[1], L),  # one tensor for all layers
    )
    chain = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in chain.items()}
    chain["arm"] = arm._replace(**{name: getattr(arm, name).to(device) for name in ("conv_weight", "conv_bias", "proj_weight", "shift")})
    return chain


def run_chain(chain, step_fn):
    """Every step, every layer in order: layer j > 0 refines with its slice of the coverage
    and gets layer j-1's returned attention as prev_attn. step_fn has
    cross_attention_step's signature (without backend). Returns the outputs
    [steps, layers, rows, nhead, hd], the returned attentions [steps, layers, rows, nhead, L]
    and the final coverage."""
    chain = clone(chain)
    steps, layers = chain["q"].shape[:2]
    outs, returns = [], []
    for t in range(steps):
        prev = None
        for j in range(layers):
            out, prev = step_fn(chain["q"][t, j], chain["k"][j], chain["v"][j], chain["key_padding_mask"],
                                chain["image_index"], chain["height"], chain["arm"],
                                None if j == 0 else chain["coverage"][:, j - 1], None if j == 0 else prev)
            outs.append(out)
            returns.append(prev)
    shape = (steps, layers) + tuple(outs[0].shape)
    return torch.stack(outs).view(shape), torch.stack(returns).view(shape[:-1] + (-1,)), chain["coverage"]


def run_chain_reference(chain):
    """run_chain on cross_attention_step itself, rows grouped by image (G rows per image):
    independent of the dispatcher's gather; inactive rows leave 0 and untouched coverage."""
    index = chain["image_index"].long().cpu()
    active = (index >= 0).nonzero().squeeze(1)
    order = active[torch.argsort(index[active], stable=True)]  # rows grouped by image
    images = chain["k"].shape[1]
    group = len(order) // images
    assert torch.equal(index[order], torch.arange(images).repeat_interleave(group)), "G rows per image"

    def grouped(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn):
        nhead, hd = q.shape[1:]
        sub_coverage = None if coverage is None else coverage[order]
        out, ret = grouped_cross_attention_step(q[order].view(images, group, nhead, hd), k, v, key_padding_mask, height, arm,
                                                sub_coverage, None if prev_attn is None else prev_attn[order])
        full_out, full_ret = torch.zeros_like(q), q.new_zeros(q.shape[0], nhead, k.shape[2])
        full_out[order], full_ret[order] = out.reshape(-1, nhead, hd), ret
        if coverage is not None:
            coverage[order] = sub_coverage
        return full_out, full_ret

    return run_chain(chain, grouped)


def check_chain(chain, step_fn, rtol=1e-5):
    expected = run_chain_reference(chain)
    actual = run_chain(chain, step_fn)
    for name, a, e in zip(("A'V", "returned", "coverage"), actual, expected):
        assert_close_rel(a, e, rtol, name)
