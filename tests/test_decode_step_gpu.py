"""The fused decode step's Triton and CUDA kernels on a GPU against the reference (skipped
without one; on CPU the Triton kernel is checked by tests/interpreter)."""
import pytest
import torch

from decode_step_cases import COVERAGE_MODES, check_against_torch, check_chain, clone, make_chain, make_step
from fastcomer.backend import cuda_extension_status
from fastcomer.ops.decode_step_dispatch import fused_cross_attention_step

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)


def require(backend):
    if backend == "cuda" and cuda_extension_status()[0] is None:
        pytest.skip(cuda_extension_status()[1])


@pytest.mark.parametrize("refine", [False, True], ids=["layer0", "refining"])
@pytest.mark.parametrize("mode", list(COVERAGE_MODES))
@pytest.mark.parametrize("nhead", [2, 8])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_matches_reference(backend, nhead, mode, refine):
    require(backend)
    check_against_torch(make_step(nhead, mode, refine, device="cuda"), backend)


@pytest.mark.parametrize("mode", list(COVERAGE_MODES))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_chained_layers_and_steps(backend, mode):
    """Three layers over four steps, coverage slices of one all-layers tensor (row-strided)."""
    require(backend)
    check_chain(make_chain(8, mode, height=9, width=11, head_dim=32, device="cuda"),
                lambda *args: fused_cross_attention_step(*args, backend=backend))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("height,width,head_dim", [(9, 11, 12), (12, 37, 32), (16, 64, 32), (3, 171, 64)])
def test_several_tiles(backend, height, width, head_dim):
    """L spanning several tiles of either kernel (ragged last tile, halos across tiles)."""
    require(backend)
    image_index = (3, 0, 2, 2, 1, 0, 3, 1)
    check_against_torch(make_step(8, "both", True, height, width, head_dim, images=4, image_index=image_index,
                                  device="cuda"), backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_inactive_rows_are_untouched(backend):
    require(backend)
    step = make_step(8, "both", image_index=(1, -1, 0, -1, 2), device="cuda")
    before = clone(step)
    out, returned = fused_cross_attention_step(**step, backend=backend)
    assert torch.equal(out[[1, 3]], torch.zeros_like(out[[1, 3]]))
    assert torch.equal(returned[[1, 3]], torch.zeros_like(returned[[1, 3]]))
    assert torch.equal(step["coverage"][[1, 3]], before["coverage"][[1, 3]])
    check_against_torch(before, backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_half_precision_inputs(backend, dtype):
    """q, k, v in half precision, coverage sums in float32: close to the float32 reference."""
    require(backend)
    step = make_step(8, "both", height=9, width=11, head_dim=32, device="cuda")
    half = {**clone(step), **{name: step[name].to(dtype) for name in ("q", "k", "v")}}
    reference = {**clone(step), **{name: half[name].float() for name in ("q", "k", "v")}}
    expected, expected_returned = fused_cross_attention_step(**reference, backend="torch")
    actual, returned = fused_cross_attention_step(**half, backend=backend)
    assert actual.dtype == dtype and returned.dtype == torch.float32
    torch.testing.assert_close(actual.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(returned, expected_returned, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(half["coverage"], reference["coverage"], rtol=1e-4, atol=1e-4)
