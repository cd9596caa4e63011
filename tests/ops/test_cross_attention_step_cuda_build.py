"""The CUDA extension builds with the nvcc here (no GPU needed): setup.py's own build path
compiles csrc/ for sm_80 and sm_90, links, and the module loads, declares its API and limits,
and names the launch fields Python sets."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastcomer.model.arm import KERNEL_SIZE
from fastcomer.ops.cross_attention_step.launch import MAX_TILE, MIN_DOT
from support.paths import REPO

NVCC = (Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc") if os.environ.get("CUDA_HOME") else shutil.which("nvcc")
if NVCC is None or not Path(NVCC).is_file():
    pytest.skip("nvcc not found in $CUDA_HOME/bin or on PATH: the CUDA extension cannot be built here", allow_module_level=True)
pytest.importorskip("pybind11", reason="pybind11 (a build requirement, in the test extra) is not installed")

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """fastcomer/_C*.so built by `setup.py build_ext` with FASTCOMER_CUDA=1 (must build)."""
    out = tmp_path_factory.mktemp("cuda_build")
    env = {**os.environ, "FASTCOMER_CUDA": "1", "FASTCOMER_CUDA_ARCHS": "80;90"}
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(out / "lib"), "--build-temp", str(out / "tmp")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, f"build failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    modules = list((out / "lib" / "fastcomer").glob("_C*.so"))
    assert len(modules) == 1, f"expected one fastcomer/_C*.so, found {modules}"
    return modules[0]


def run_python(code: str, module: Path) -> subprocess.CompletedProcess:
    """Loads the built module in a fresh process (a crash cannot take pytest down)."""
    prelude = textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("_C", {str(module)!r})
        C = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(C)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env)


def find_cuobjdump():
    """Beside nvcc, on PATH, or the copy Triton ships."""
    beside = Path(NVCC).resolve().parent / "cuobjdump"
    if beside.is_file():
        return str(beside)
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else None


def test_kernels_compiled_for_sm80_and_sm90(built):
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (beside nvcc, on PATH or in Triton): cannot list the embedded cubins")
    listing = subprocess.run([cuobjdump, "--list-elf", str(built)], capture_output=True, text=True, check=True).stdout
    assert "sm_80" in listing and "sm_90" in listing, listing


def test_module_loads_and_declares_its_api(built):
    result = run_python("""
        print(C.build_info())
        print(C.supported_shapes())
        print(sorted(C.LIMITS.items()))
        print(C.cross_attention_step.__doc__.split(chr(10))[0])
    """, built)
    assert result.returncode == 0, result.stderr
    info, shapes, limits, signature = result.stdout.strip().split("\n")
    assert "sm_80;sm_90" in info and "CUDA runtime" in info
    assert "nhead <= 16" in shapes
    assert limits == str(sorted(dict(kernel_size=KERNEL_SIZE, threads=128, max_heads=16, dc=32, max_head_dim=128, tile=MIN_DOT,
                                     max_tile=MAX_TILE, stats=4).items()))
    assert signature.startswith("cross_attention_step(params: _C.CrossAttentionStepParams, stream: "), signature


def test_python_sets_every_launch_field(built):
    """cuda_kernel.launch_fields (run here on CPU tensors, no launch) names exactly the fields of
    csrc's one list, and launch_params sets each one: the two sides cannot drift apart unnoticed."""
    result = run_python("""
        from fastcomer.ops.cross_attention_step.cuda_kernel import launch_fields, launch_params
        from fastcomer.ops.cross_attention_step.inputs import check_inputs
        from support.cross_attention_step_cases import make_step
        step = make_step(8, "both")
        buffers, scalars = launch_fields(*step.values(), shape=check_inputs(*step.values()), rows_per_image=None,
                                         stats_fields=C.LIMITS["stats"])
        params = launch_params(C, buffers, scalars)
        for name, tensor in buffers.items():
            assert getattr(params, name) == (0 if tensor is None else tensor.data_ptr()), name
        for name, value in scalars.items():
            assert getattr(params, name) == (getattr(C.DType, value) if name == "dtype" else value), name
        print(len(buffers), len(scalars))
    """, built)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["16", "27"]  # pointers; sizes, strides and flags


BASE = dict(q=1, k=1, v=1, key_padding_mask=1, image_index=1, returned=1, out=1, stats=1, partial=1, rows=4, nhead=8,
            head_dim=32, length=12, height=3, width=4, q_stride_row=256, q_stride_head=32, k_stride_image=3072,
            k_stride_head=384, k_stride_pos=32, v_stride_image=3072, v_stride_head=384, v_stride_pos=32,
            mask_stride_image=12, rows_per_slot=1, split_length=16, splits=1, tile_length=16)
SET_FIELDS = """
def params(**fields):
    p = C.CrossAttentionStepParams()
    for name, value in fields.items():
        setattr(p, name, value)
    return p
"""


def test_bad_shapes_raise_before_any_launch(built):
    """Validation runs on the host, before CUDA is touched: clear ValueErrors, no crash."""
    result = run_python(SET_FIELDS + f"""
base = {BASE!r}
arm = dict(coverage=1, coverage_stride_row=192, channels=16, dc=32, conv_weight=1, conv_bias=1, proj_weight=1, shift=1)
for change in (dict(nhead=17), dict(head_dim=256), dict(height=5, width=3),
               dict(coverage=1, channels=16, dc=16), dict(q=0), dict(partial=0),
               dict(arm, coverage_stride_row=100), dict(arm, update_self=True), dict(prev_attn=1),
               dict(rows_per_slot=17), dict(split_length=24), dict(tile_length=256), dict(splits=2)):
    try:
        C.cross_attention_step(params(**{{**base, **change}}), 0)
    except ValueError as err:
        print("ValueError:", err)
try:
    params(dtype=2)
except TypeError:
    print("TypeError: dtype")
""", built)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().split("\n")
    assert len(lines) == 14 and all(line.startswith("ValueError: fastcomer._C.cross_attention_step") for line in lines[:13]), result.stdout
    assert "nhead 17 is not supported" in lines[0] and "dc 16 unsupported" in lines[3]
    assert "height * width != L" in lines[2]
    assert "required pointer is null" in lines[4] and "required pointer is null" in lines[5]
    assert "coverage rows overlap" in lines[6] and "update_self needs coverage and scratch" in lines[7]
    assert "prev_attn (the cross-coverage update) needs coverage" in lines[8]
    assert "rows_per_slot must be in [1, 16]" in lines[9]
    assert all("multiples of 16 up to 128" in line for line in lines[10:12]) and "splits != ceil" in lines[12]
    assert lines[13] == "TypeError: dtype"  # a DType, never an unchecked int


@pytest.mark.skipif(torch.cuda.is_available(), reason="a real device would run the launch on these fake pointers")
def test_launch_without_a_device_raises(built):
    result = run_python(SET_FIELDS + f"""
try:
    C.cross_attention_step(params(**{{**{BASE!r}, "rows": 1}}), 0)
except RuntimeError as err:
    print("RuntimeError:", err)
""", built)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("RuntimeError: fastcomer._C.cross_attention_step: launch of"), result.stdout
