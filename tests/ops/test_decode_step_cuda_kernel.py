"""csrc's CUDA decode-step kernels, compiled for the host with tests/support/cuda_emulation.h
(each block as 128 threads with real barriers, wmma tiles with TF32 rounding), run with csrc's
own launch plan against the reference: the kernels' logic, the split of L and its merge, and
the 3xTF32 products' accuracy are checked here without a GPU. __expf, FMA contraction and
speed are not: those are tests/ops/test_decode_step_dispatch.py's job on a device."""
import itertools
import shutil
import subprocess

import numpy as np
import pytest
import torch

from support.asserts import assert_close_rel
from support.paths import REPO
from support.decode_step_cases import COVERAGE_MODES, check_chain, clone, make_chain, make_step
from fastcomer.ops.decode_step import fused_cross_attention_step
from fastcomer.ops.decode_step.interface import check_inputs, launch_plan, plan

COVERAGE_GAP = 5  # floats between the coverage rows the emulated kernel gets
CXX = shutil.which("g++") or shutil.which("c++")
if CXX is None:
    pytest.skip("no C++ compiler to build the host emulation of the CUDA kernel", allow_module_level=True)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    binary = tmp_path_factory.mktemp("emulation") / "driver"
    result = subprocess.run(
        [CXX, "-std=c++20", "-O1", "-pthread", f"-I{REPO / 'csrc'}", f"-I{REPO / 'tests' / 'support'}",
         str(REPO / "tests" / "support" / "cuda_emulation_driver.cpp"), "-o", str(binary)],
        capture_output=True, text=True,
    )
    if result.returncode != 0 and "barrier" in result.stderr and "No such file" in result.stderr:
        pytest.skip(f"{CXX} lacks C++20 <barrier>")
    assert result.returncode == 0, result.stderr[-4000:]
    return binary


def run_emulated(driver, step, workdir, rows_per_image=None):
    """The kernels' outputs (A'V, the returned attention, and the coverage after the step,
    also written back to step["coverage"]) for a float32 step, split as cuda_step splits it.
    The kernels see the coverage rows COVERAGE_GAP floats apart, the gaps filled with NaN (a
    read there would show)."""
    shape = check_inputs(**step)
    flags = plan(step["arm"], step["coverage"])
    launch = launch_plan(shape.rows, shape.nhead, shape.length, rows_per_image)
    row_size = shape.channels * shape.length
    meta = [shape.rows, shape.nhead, shape.head_dim, shape.length, shape.height, shape.channels, shape.dc,
            int(flags.update_self), int(flags.refine), int(flags.update_cross),
            int(step["image_index"].dtype == torch.int64), row_size + COVERAGE_GAP,
            launch.rows_per_slot, launch.split_l, launch.splits, launch.tile_l]
    arrays = {"meta": torch.tensor(meta, dtype=torch.int64), "key_padding_mask": step["key_padding_mask"].to(torch.uint8)}
    arrays.update({name: step[name] for name in ("q", "k", "v", "image_index") if step[name] is not None})
    if flags.refine:
        coverage = torch.full((shape.rows, row_size + COVERAGE_GAP), float("nan"))
        coverage[:, :row_size] = step["coverage"].reshape(shape.rows, row_size)
        arrays["coverage"] = coverage
    if flags.update_cross:
        arrays["prev_attn"] = step["prev_attn"]
    arrays.update({name: getattr(step["arm"], name) for name in ("conv_weight", "conv_bias", "proj_weight", "shift")})
    for name, tensor in arrays.items():
        tensor.detach().contiguous().numpy().tofile(workdir / name)
    subprocess.run([str(driver), str(workdir)], check=True, timeout=300)
    read = lambda name, shape: torch.from_numpy(np.fromfile(workdir / name, np.float32)).view(shape)
    result = {"out": read("out", step["q"].shape), "returned": read("returned", (shape.rows, shape.nhead, shape.length))}
    if flags.refine:
        padded = read("coverage_out", coverage.shape)
        assert padded[:, row_size:].isnan().all(), "the kernel wrote between coverage rows"
        result["coverage"] = padded[:, :row_size].reshape(step["coverage"].shape)
        step["coverage"].copy_(result["coverage"])
    return result


def check(driver, step, tmp_path, rows_per_image=None):
    expected_step = clone(step)
    expected, expected_returned = fused_cross_attention_step(**expected_step, backend="torch")
    actual = run_emulated(driver, step, tmp_path, rows_per_image)
    assert_close_rel(actual["out"], expected, 1e-5, "A'V")
    assert_close_rel(actual["returned"], expected_returned, 1e-5, "returned")
    if step["coverage"] is not None:
        assert_close_rel(actual["coverage"], expected_step["coverage"], 1e-5, "coverage")


@pytest.mark.parametrize("nhead,mode,refine", itertools.product([2, 8], COVERAGE_MODES, [False, True]))
def test_emulated_kernel_matches_reference(driver, tmp_path, nhead, mode, refine):
    check(driver, make_step(nhead, mode, refine), tmp_path)


@pytest.mark.parametrize("mode", ["cross", "both"])
def test_emulated_kernel_chained_layers_and_steps(driver, tmp_path, mode):
    """Three layers over two steps through the emulated kernels against the reference chained."""
    def step_fn(*args):
        names = ("q", "k", "v", "key_padding_mask", "image_index", "height", "arm", "coverage", "prev_attn")
        result = run_emulated(driver, dict(zip(names, args)), tmp_path)
        return result["out"], result["returned"]

    check_chain(make_chain(4, mode, steps=2), step_fn)


@pytest.mark.parametrize("nhead,height,width,head_dim,image_index", [
    (8, 12, 37, 32, (3, 0, 2, 2, 1, 0, 3, 1)),  # 7 splits of 64, 28 tiles of 16: halos across tiles
    (1, 3, 171, 64, (3, 1)),  # wide: 33 splits and tiles, a ragged last one
    (16, 9, 11, 12, (0, 3)),  # the most heads; head_dim neither a multiple of 16 nor of 8
    (4, 9, 11, 128, (2, 1)),  # the largest head_dim
])
def test_emulated_kernel_shapes(driver, tmp_path, nhead, height, width, head_dim, image_index):
    check(driver, make_step(nhead, "both", True, height, width, head_dim, images=4, image_index=image_index), tmp_path)


@pytest.mark.parametrize("image_index", [(0, 0, 0, 1, 1, 1, 2, 2, 2), (0, -1, 0, -1, -1, -1, 2, 2, -1)],
                         ids=["all", "skipped"])
def test_emulated_kernel_rows_per_image(driver, tmp_path, image_index):
    """rows_per_image = 3: a slot of 3 rows shares each K/V tile; skipped rows (one, or a whole
    slot) give 0 and keep their coverage."""
    step = make_step(8, "both", image_index=image_index, height=6, width=11, head_dim=32)
    before = clone(step)
    check(driver, step, tmp_path, rows_per_image=3)
    skipped = torch.tensor(image_index) < 0
    assert torch.equal(step["coverage"][skipped], before["coverage"][skipped])


def test_emulated_kernel_skips_inactive_rows(driver, tmp_path):
    step = make_step(8, "both", image_index=(1, -1, 0, -1, 2))
    step["image_index"] = step["image_index"].long()
    actual = run_emulated(driver, clone(step), tmp_path)
    assert torch.equal(actual["out"][[1, 3]], torch.zeros(2, 8, 8))
    assert torch.equal(actual["returned"][[1, 3]], torch.zeros(2, 8, step["key_padding_mask"].shape[1]))
    assert torch.equal(actual["coverage"][[1, 3]], step["coverage"][[1, 3]])
    check(driver, step, tmp_path)
