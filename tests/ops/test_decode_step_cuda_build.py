"""The CUDA extension builds with the nvcc here (no GPU needed): setup.py's own build path
compiles csrc/ for sm_80 and sm_90, links, and the module loads and declares its API."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from support.paths import REPO

NVCC = (Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc") if os.environ.get("CUDA_HOME") else shutil.which("nvcc")
if NVCC is None or not Path(NVCC).is_file():
    pytest.skip("nvcc not found in $CUDA_HOME/bin or on PATH: the CUDA extension cannot be built here", allow_module_level=True)
pytest.importorskip("pybind11", reason="pybind11 (a build requirement, in the test extra) is not installed")

EXPECTED_ARGS = ("q", "k", "v", "key_padding_mask", "image_index", "image_index_int64", "coverage",
                 "coverage_stride_row", "prev_attn", "update_self", "conv_weight", "conv_bias", "proj_weight", "shift",
                 "scratch", "returned", "out", "stats", "partial", "dtype", "rows", "nhead", "head_dim", "length",
                 "height", "channels", "dc", "rows_per_slot", "split_length", "splits", "tile_length", "vectorized_q",
                 "vectorized_kv", "stream")
SPLIT = dict(stats=1, partial=1, rows_per_slot=1, split_length=16, splits=1, tile_length=16, vectorized_q=False,
             vectorized_kv=False)


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
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


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
        print(C.decode_step.__doc__)
    """, built)
    assert result.returncode == 0, result.stderr
    info, shapes, doc = result.stdout.split("\n", 2)
    assert "sm_80;sm_90" in info and "CUDA runtime" in info
    assert "nhead <= 16" in shapes
    signature = doc.split("\n", 1)[0]
    for name in EXPECTED_ARGS:
        assert f"{name}:" in signature, f"decode_step lacks argument {name!r}: {signature}"


def test_bad_shapes_raise_before_any_launch(built):
    """Validation runs on the host, before CUDA is touched: clear ValueErrors, no crash."""
    result = run_python(f"""
        base = dict(**{SPLIT!r}, q=1, k=1, v=1, key_padding_mask=1, image_index=1, image_index_int64=False, coverage=0,
                    coverage_stride_row=0, prev_attn=0, update_self=False, conv_weight=0, conv_bias=0, proj_weight=0,
                    shift=0, scratch=0, returned=1, out=1, dtype=0, rows=4, nhead=8, head_dim=32, length=12, height=3, channels=0, dc=0,
                    q_stride_row=256, q_stride_head=32, k_stride_image=3072, k_stride_head=384, k_stride_pos=32,
                    v_stride_image=3072, v_stride_head=384, v_stride_pos=32, mask_stride_image=12, stream=0)
        arm = dict(coverage=1, coverage_stride_row=192, channels=16, dc=32, conv_weight=1, conv_bias=1,
                   proj_weight=1, shift=1)
        for change in (dict(nhead=17), dict(head_dim=256), dict(height=5), dict(dtype=7),
                       dict(coverage=1, channels=16, dc=16), dict(q=0), dict(partial=0),
                       dict(arm, coverage_stride_row=100), dict(arm, update_self=True), dict(prev_attn=1),
                       dict(rows_per_slot=17), dict(split_length=24), dict(tile_length=256), dict(splits=2)):
            try:
                C.decode_step(**{{**base, **change}})
            except ValueError as err:
                print("ValueError:", err)
    """, built)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().split("\n")
    assert len(lines) == 14 and all(line.startswith("ValueError: fastcomer._C.decode_step") for line in lines), result.stdout
    assert "nhead 17 is not supported" in lines[0] and "dc 16 unsupported" in lines[4]
    assert "required pointer is null" in lines[5] and "required pointer is null" in lines[6]
    assert "coverage rows overlap" in lines[7] and "update_self needs coverage and scratch" in lines[8]
    assert "prev_attn (the cross-coverage update) needs coverage" in lines[9]
    assert "rows_per_slot must be in [1, 16]" in lines[10]
    assert all("multiples of 16 up to 128" in line for line in lines[11:13]) and "splits != ceil" in lines[13]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a real device would run the launch on these fake pointers")
def test_launch_without_a_device_raises(built):
    result = run_python(f"""
        try:
            C.decode_step(**{SPLIT!r}, q=16, k=16, v=16, key_padding_mask=16, image_index=16, image_index_int64=False, coverage=0,
                          coverage_stride_row=0, prev_attn=0, update_self=False, conv_weight=0, conv_bias=0,
                          proj_weight=0, shift=0, scratch=0, returned=16, out=16, dtype=0, rows=1, nhead=8, head_dim=32, length=12, height=3, channels=0,
                          dc=0, q_stride_row=256, q_stride_head=32, k_stride_image=3072, k_stride_head=384,
                          k_stride_pos=32, v_stride_image=3072, v_stride_head=384, v_stride_pos=32,
                          mask_stride_image=12, stream=0)
        except RuntimeError as err:
            print("RuntimeError:", err)
    """, built)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("RuntimeError: fastcomer._C.decode_step: launch of"), result.stdout
