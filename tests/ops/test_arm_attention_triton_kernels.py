"""The fused ARM attention kernels compile for NVIDIA GPUs (sm_80, sm_90) without one: Triton's
compiler and its bundled ptxas run on the CPU. Every variant the training step launches
(fastcomer.ops.arm_attention.variants, the list the static report compiles), in every dtype
mode: catches what the interpreter accepts and the GPU compiler does not (constexpr rules,
shared-memory budget) before a GPU machine sees it."""
import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":  # jit functions are interpreted then, not compiled
    pytest.skip("compilation is checked outside the interpreter", allow_module_level=True)

from fastcomer.kernel_report import compile_variant  # noqa: E402
from fastcomer.ops.arm_attention.variants import kernel_variants  # noqa: E402

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # per block
# sm_80 in the modes whose code differs most (tensor cores, half operands), to bound CI time
MODES = {90: ("fp32-ieee", "fp32-tf32", "bf16", "fp16"), 80: ("fp32-tf32", "bf16")}


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_within_shared_memory(arch):
    variants = [v for v in kernel_variants("small", arch) if v.dtype in MODES[arch]]
    assert len(variants) == 9 * len(MODES[arch])
    for variant in variants:  # one shape: every variant is a distinct compile
        shared = compile_variant(variant, arch).metadata.shared
        assert shared <= SHARED_MEMORY_LIMIT[arch], f"{variant.name}: {shared} bytes of shared memory"
