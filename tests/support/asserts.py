"""Comparisons the tests share."""
import torch


def assert_close_rel(actual, expected, rtol, what=""):
    """max |actual - expected| <= rtol * max |expected|: relative to the tensor's scale,
    so that entries near zero do not demand more digits than the computation has."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:.0e} * {scale:.3e}"
