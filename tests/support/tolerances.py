"""Every tolerance the tests compare numbers with, and the one allowance they are built from.

An allowance is

    max(rtol x scale,  residue x the reference path's own error,  floor)

with floor = factor x eps(dtype) x the scale of the terms summed into the value. The first
two terms can both be 0 on some machine: a value that vanishes in exact arithmetic (scale 0)
and a plain path that happens to round it to exactly 0 too (its error 0) leave nothing for
a kernel that sums in another order. The floor is what rounding the inputs alone allows, so
an exactly-zero value is compared against the magnitudes that entered it, never against 0.
"""
import torch

# Relative error, against a float64 reference and relative to the compared tensor's scale,
# of one op or one short chain computed in each dtype / precision mode.
RTOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    "tf32": 1e-3,  # float32 storage, matmul inputs rounded to 10 bits of mantissa
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
# Where a comparison is between two float64 computations of the same math (reference
# against reference, stepped against whole-sequence): only reassociation differs.
RTOL_SAME_MATH_FLOAT64 = 1e-12

# The golden file's scores (first pass, final): float32 roundings of float64 sums.
RTOL_GOLDEN_SCORES = 1e-6

# A whole search in half precision against float32 (scores summed over every step; bfloat16
# keeps 8 bits of mantissa).
HALF_SEARCH_SCORE_RTOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}

# The fused ARM layer with float16/bfloat16 inputs or TF32 matmuls (float32 accumulation and
# coverage), forward, statistics and gradients against float64, at the published shapes (GPU)
# and on the interpreter's small shapes (fewer, shorter sums: tighter).
RTOL_ARM_LAYER = {(torch.float32, "tf32"): 5e-3, (torch.float16, "ieee"): 5e-3, (torch.bfloat16, "ieee"): 4e-2}
RTOL_ARM_LAYER_SMALL_FLOAT16 = 2e-3

# The floor's factor: a few roundings per summed term (the product, the partial sum, the
# input's own rounding to dtype).
FLOOR_FACTOR = 4


def rtol(dtype, precision="ieee"):
    """The relative tolerance of RTOL for a dtype and a precision mode ("ieee" or "tf32")."""
    if precision == "tf32" and dtype == torch.float32:
        return RTOL["tf32"]
    return RTOL[dtype]


def eps(dtype):
    """Machine epsilon of a floating dtype (the spacing of its numbers at 1)."""
    return torch.finfo(dtype).eps


def rounding_floor(dtype, terms_scale, factor=FLOOR_FACTOR):
    """The error rounding allows a value computed in `dtype` from summed terms whose
    magnitudes add up to `terms_scale` (for a sum of products, sum |a_i b_i|)."""
    return factor * eps(dtype) * terms_scale


def allowance(scale, rtol, dtype, terms_scale=0.0, reference_error=0.0, residue=0.0, factor=FLOOR_FACTOR):
    """max(rtol x scale, residue x reference_error, rounding_floor(dtype, terms_scale)).
    scale: the compared tensor's max |value|. terms_scale: the scale of what was summed into
    it, given wherever the value can vanish by cancellation (without it, 0: a value that does
    not vanish is covered by rtol x scale, and a floor on it would only loosen the check)."""
    return max(rtol * scale, residue * reference_error, rounding_floor(dtype, terms_scale, factor))


def accumulation_dtype(dtype):
    """The dtype the library's kernels and the plain path accumulate a dtype's sums in (float32
    at least): the dtype of a sum's rounding floor."""
    return torch.promote_types(dtype, torch.float32)


def max_error(actual, expected):
    """max |actual - expected| in float64 (0 for empty tensors)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if expected.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def scale_of(tensor):
    """max |tensor| in float64 (0 for an empty tensor)."""
    tensor = torch.as_tensor(tensor)
    return tensor.double().abs().max().item() if tensor.numel() else 0.0


# A whole model's gradients against a reference: each relative to its own scale, floored at a
# fraction of the largest gradient (the ARM BatchNorm bias's gradient vanishes in exact
# arithmetic: softmax ignores a shift per head, so it is rounding noise of the other sums).
GRADIENT_FLOOR = 1e-3  # float32 against float32 or float64 (patch() tests)
GRADIENT_FLOOR_FLOAT64 = 1e-6  # float64 against the float64 golden file
# float32 against float32 (the plain path of the same model): the same function rounded
# differently, through three layers and a softmax over 113 classes.
RTOL_FLOAT32_CHAIN = 2e-5
# float32 against the float64 golden values, through the whole decoder.
RTOL_FLOAT32_GOLDEN = 2e-4
