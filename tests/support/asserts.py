"""Comparisons the tests share (their tolerances: support.tolerances)."""
import torch

from support.tolerances import accumulation_dtype, allowance, max_error, scale_of


def _as_tensor(x):
    # Python numbers (scores) compared in float64, not in torch's default float32
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def assert_close_rel(actual, expected, rtol, what="", terms_scale=0.0):
    """max |actual - expected| <= allowance(max |expected|, rtol, actual's dtype, terms_scale):
    relative to the tensor's scale, so that entries near zero do not demand more digits than
    the computation has; where the value can vanish, never below the rounding of the summed
    terms (terms_scale: support.tolerances.allowance), so that it is not compared against 0."""
    actual, expected = _as_tensor(actual), _as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    dtype = accumulation_dtype(actual.dtype) if actual.is_floating_point() else torch.float64
    err, scale = max_error(actual, expected), scale_of(expected)
    allowed = allowance(scale, rtol, dtype, terms_scale)
    assert err <= allowed, f"{what}: max abs error {err:.3e} > {allowed:.3e} ({rtol:.0e} * {scale:.3e})"


def assert_gradients_close(grads, expected, rtol, floor_fraction, what="", plain=None, residue=4):
    """Every gradient of `expected` (name -> tensor): error <= rtol x max(its scale,
    floor_fraction x the largest gradient's scale) or, with `plain` (the plain path's
    gradients in the tested dtype), residue x the plain path's own error: sums with heavy
    cancellation carry that dtype's noise."""
    overall = max(scale_of(g) for g in expected.values())
    for name, want in expected.items():
        err, scale = max_error(grads[name], want), scale_of(want)
        allowed = rtol * max(scale, floor_fraction * overall)
        if plain is not None:
            allowed = max(allowed, residue * max_error(plain[name], want))
        assert err <= allowed, f"{what}: gradient of {name}: {err:.3e} > {allowed:.3e}"
