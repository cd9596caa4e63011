"""The tests' own allowances (support.tolerances): a value that vanishes in exact arithmetic is
compared against the rounding of what was summed into it, never against 0."""
import pytest
import torch

from support.arm_cases import check_close
from support.asserts import assert_close_rel
from support.tolerances import FLOOR_FACTOR, allowance, eps, rtol


def test_the_table_per_dtype_and_precision():
    assert rtol(torch.float32) == 1e-5 and rtol(torch.float32, "tf32") == 1e-3
    assert rtol(torch.float64) == 1e-9 and rtol(torch.float16) == rtol(torch.bfloat16) == 1e-2


def test_a_vanishing_value_gets_the_rounding_floor():
    # issue 19's CI failure: exact gradient 0, the plain path's error 0, the fused 5.8e-13
    zero = torch.zeros(2, dtype=torch.float64)
    got = torch.tensor([5.793e-13, 0.0])
    with pytest.raises(AssertionError):
        check_close("no terms given", got, zero, zero.float(), 1e-4)
    check_close("terms of scale 1", got, zero, zero.float(), 1e-4, terms_scale=1.0)
    with pytest.raises(AssertionError):  # the floor is rounding, not a free pass
        check_close("an error above rounding", torch.tensor([1e-5, 0.0]), zero, zero.float(), 1e-4, terms_scale=1.0)
    assert allowance(0.0, 1e-5, torch.float32, terms_scale=2.0) == FLOOR_FACTOR * eps(torch.float32) * 2.0


def test_the_floor_never_loosens_a_value_that_does_not_vanish():
    assert allowance(3.0, 1e-5, torch.float32) == 1e-5 * 3.0
    assert_close_rel(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1.5e-5]), 1e-5)
    with pytest.raises(AssertionError):
        assert_close_rel(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 5e-5]), 1e-5)


def test_python_scores_are_compared_in_float64():
    # torch.as_tensor would make these float32, where they are equal
    with pytest.raises(AssertionError):
        assert_close_rel([1.0 + 1e-9], [1.0], 1e-12)
