"""csrc's CUDA cross-attention step kernels, compiled for the host with tests/support/cuda_emulation.h
(each block as 128 threads with real barriers, wmma tiles with TF32 rounding), run with csrc's
own launch plan against the reference: the kernels' logic, the split of L and its merge, and
the 3xTF32 products' accuracy are checked here without a GPU. __expf, FMA contraction and
speed are not: those are tests/ops/test_cross_attention_step_dispatch.py's job on a device."""
import itertools
import shutil
import subprocess

import numpy as np
import pytest
import torch

from support.asserts import assert_close_rel
from support.paths import REPO
from support.cross_attention_step_cases import COVERAGE_MODES, check_chain, clone, make_chain, make_step
from fastcomer.ops.cross_attention_step import cross_attention_step
from fastcomer.kernel_report import csrc_constant
from fastcomer.ops.cross_attention_step.cuda_kernel import launch_fields
from fastcomer.ops.cross_attention_step.inputs import check_inputs

COVERAGE_GAP = 5  # floats between the coverage rows the emulated kernel gets
STATS_FIELDS = csrc_constant("kStats")  # floats per split's statistics, as the driver compiles them
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
    also written back to step["coverage"]) for a float32 step, given the launch fields the CUDA
    launcher would (`cuda_kernel.launch_fields`). The kernels see the coverage rows
    COVERAGE_GAP floats apart, the gaps filled with NaN (a read there would show); outputs and
    scratch start as sentinels."""
    shape = check_inputs(**step)
    coverage = step["coverage"]
    if coverage is not None:
        row_size = shape.channels * shape.length
        padded = torch.full((shape.rows, row_size + COVERAGE_GAP), float("nan"))
        padded[:, :row_size] = coverage.reshape(shape.rows, row_size)
        step = {**step, "coverage": padded[:, :row_size].view(coverage.shape)}
    buffers, scalars = launch_fields(**step, shape=shape, rows_per_image=rows_per_image, stats_fields=STATS_FIELDS)
    for name in ("out", "returned", "scratch", "stats", "partial"):
        if buffers[name] is not None:
            buffers[name].fill_(12345.0)
    if coverage is not None:
        buffers["coverage"] = padded  # the file holds the whole buffer, gaps included
    for name, tensor in buffers.items():
        if tensor is not None:
            (tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor).contiguous().numpy().tofile(workdir / name)
    assert scalars["dtype"] == "float32"  # the emulation runs the float32 kernels: DType code 0
    text = {**{name: int(value) for name, value in scalars.items() if name != "dtype"}, "dtype": 0}
    (workdir / "scalars").write_text("".join(f"{name} {value}\n" for name, value in text.items()))
    # a guard against a hung driver, not a speed check: a loaded 2-core machine takes minutes
    subprocess.run([str(driver), str(workdir)], check=True, timeout=1800)
    read = lambda name, shape: torch.from_numpy(np.fromfile(workdir / f"{name}.result", np.float32)).view(shape)
    result = {"out": read("out", step["q"].shape), "returned": read("returned", (shape.rows, shape.nhead, shape.length))}
    if coverage is not None:
        written = read("coverage", padded.shape)
        assert written[:, row_size:].isnan().all(), "the kernel wrote between coverage rows"
        result["coverage"] = written[:, :row_size].reshape(coverage.shape)
        coverage.copy_(result["coverage"])
    return result


def check(driver, step, tmp_path, rows_per_image=None):
    expected_step = clone(step)
    expected, expected_returned = cross_attention_step(**expected_step, backend="torch")
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
