"""MaskBatchNorm2d (masked sums, no data-dependent shapes) against nn.BatchNorm1d applied to
the unmasked positions gathered into rows, as CoMER computes it: outputs, gradients, and the
running statistics over several training calls."""
import copy

import pytest
import torch

from fastcomer.model.arm import MaskBatchNorm2d


def gathered_batchnorm(bn: torch.nn.BatchNorm1d, x, mask):
    """CoMER's masked BatchNorm: BatchNorm1d on x[~mask] rows, written back in place."""
    rows = x.permute(0, 2, 3, 1)
    keep = ~mask
    return rows.index_put((keep,), bn(rows[keep])).permute(0, 3, 1, 2)


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_batchnorm1d_on_gathered_rows(momentum, affine):
    g = torch.Generator().manual_seed(0)
    masked = MaskBatchNorm2d(3)
    masked.bn = torch.nn.BatchNorm1d(3, momentum=momentum, affine=affine).double()
    if affine:
        with torch.no_grad():
            masked.bn.weight.normal_(generator=g)
            masked.bn.bias.normal_(generator=g)
    plain = copy.deepcopy(masked.bn)
    for call in range(3):  # running statistics accumulate over calls (cumulative average for momentum None)
        x = torch.randn(4, 3, 2, 5, generator=g, dtype=torch.float64) * (call + 1) + call
        mask = torch.rand(4, 2, 5, generator=g) < 0.4
        x_masked, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
        upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)
        out, want = masked(x_masked, mask), gathered_batchnorm(plain, x_plain, mask)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        params = [p for p in masked.bn.parameters()]
        got_grads = torch.autograd.grad((out * upstream).sum(), [x_masked, *params])
        want_grads = torch.autograd.grad((want * upstream).sum(), [x_plain, *plain.parameters()])
        for got, expected in zip(got_grads, want_grads):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        assert int(masked.bn.num_batches_tracked) == int(plain.num_batches_tracked) == call + 1
        torch.testing.assert_close(masked.bn.running_mean, plain.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(masked.bn.running_var, plain.running_var, rtol=1e-12, atol=1e-14)
    masked.eval(), plain.eval()
    x = torch.randn(2, 3, 2, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 2, 5, generator=g) < 0.4
    torch.testing.assert_close(masked(x, mask), gathered_batchnorm(plain, x, mask), rtol=1e-12, atol=1e-12)


def test_masked_positions_keep_their_input_even_when_not_finite():
    """Masked positions pass through and never reach the statistics (torch.where, not a product)."""
    masked = MaskBatchNorm2d(2).double().train()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[1, 2] = True
    x[1, :, 2] = float("inf")
    out = masked(x, mask)
    assert torch.equal(out[1, :, 2], x[1, :, 2])
    assert torch.isfinite(out[~mask[:, None].expand_as(out)]).all()
    assert torch.isfinite(masked.bn.running_mean).all() and torch.isfinite(masked.bn.running_var).all()
