"""csrc's CUDA decode-step kernel, compiled for the host with tests/cuda_emulation.h (each
block as 256 threads with real barriers), against the reference: the kernel's logic is
checked here without a GPU. Precision (__expf, FMA contraction) and speed are not: those
are tests/test_decode_step_gpu.py's job on a device."""
import itertools
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import REPO, assert_close_rel
from decode_step_cases import COVERAGE_MODES, clone, make_step
from fastcomer.ops.decode_step_dispatch import check_inputs, fused_cross_attention_step

CXX = shutil.which("g++") or shutil.which("c++")
if CXX is None:
    pytest.skip("no C++ compiler to build the host emulation of the CUDA kernel", allow_module_level=True)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    binary = tmp_path_factory.mktemp("emulation") / "driver"
    result = subprocess.run(
        [CXX, "-std=c++20", "-O1", "-pthread", f"-I{REPO / 'csrc'}", f"-I{REPO / 'tests'}",
         str(REPO / "tests" / "cuda_emulation_driver.cpp"), "-o", str(binary)],
        capture_output=True, text=True,
    )
    if result.returncode != 0 and "barrier" in result.stderr and "No such file" in result.stderr:
        pytest.skip(f"{CXX} lacks C++20 <barrier>")
    assert result.returncode == 0, result.stderr[-4000:]
    return binary


def run_emulated(driver, step, workdir):
    """The kernel's outputs (A'V and both coverages after the step) for a contiguous float32 step."""
    shape = check_inputs(**step)
    arm = step["arm"]
    refine = step["coverage"] is not None
    meta = [shape.rows, shape.nhead, shape.head_dim, shape.length, shape.height, shape.channels, shape.dc,
            int(refine and arm.self_coverage), int(refine), int(step["next_coverage"] is not None and arm.cross_coverage),
            int(step["image_index"].dtype == torch.int64)]
    arrays = {"meta": torch.tensor(meta, dtype=torch.int64), "key_padding_mask": step["key_padding_mask"].to(torch.uint8)}
    arrays.update({name: step[name] for name in ("q", "k", "v", "image_index", "coverage", "next_coverage") if step[name] is not None})
    arrays.update({name: getattr(arm, name) for name in ("conv_weight", "conv_bias", "proj_weight", "shift")})
    for name, tensor in arrays.items():
        tensor.detach().contiguous().numpy().tofile(workdir / name)
    subprocess.run([str(driver), str(workdir)], check=True, timeout=300)
    result = {"out": torch.from_numpy(np.fromfile(workdir / "out", np.float32)).view(step["q"].shape)}
    for name in ("coverage", "next_coverage"):
        if step[name] is not None:
            result[name] = torch.from_numpy(np.fromfile(workdir / f"{name}_out", np.float32)).view(step[name].shape)
    return result


def check(driver, step, tmp_path):
    expected_step = clone(step)
    expected = fused_cross_attention_step(**expected_step, backend="torch")
    actual = run_emulated(driver, step, tmp_path)
    assert_close_rel(actual["out"], expected, 1e-5, "A'V")
    for name in ("coverage", "next_coverage"):
        if step[name] is not None:
            assert_close_rel(actual[name], expected_step[name], 1e-5, name)


@pytest.mark.parametrize("nhead,mode,layer", itertools.product([2, 8], COVERAGE_MODES, ["first", "middle", "last"]))
def test_emulated_kernel_matches_reference(driver, tmp_path, nhead, mode, layer):
    check(driver, make_step(nhead, mode, layer), tmp_path)


@pytest.mark.parametrize("nhead,height,width,head_dim,image_index", [
    (8, 12, 37, 32, (3, 0, 2, 2, 1, 0, 3, 1)),  # two tiles of 256 positions: halos across tiles
    (1, 3, 171, 64, (3, 1)),  # wide, many warps slicing one head's A'V
    (16, 9, 11, 12, (0, 3)),  # more heads than warps
    (4, 9, 11, 128, (2, 1)),  # the largest head_dim
])
def test_emulated_kernel_shapes(driver, tmp_path, nhead, height, width, head_dim, image_index):
    check(driver, make_step(nhead, "both", "middle", height, width, head_dim, images=4, image_index=image_index), tmp_path)


def test_emulated_kernel_skips_inactive_rows(driver, tmp_path):
    step = make_step(8, "both", "middle", image_index=(1, -1, 0, -1, 2))
    step["image_index"] = step["image_index"].long()
    actual = run_emulated(driver, clone(step), tmp_path)
    assert torch.equal(actual["out"][[1, 3]], torch.zeros(2, 8, 8))
    for name in ("coverage", "next_coverage"):
        assert torch.equal(actual[name][[1, 3]], step[name][[1, 3]])
    check(driver, step, tmp_path)
