"""The static GPU report (fastcomer.kernel_report) and the budgets it enforces on the training
kernels, compiled for sm_90 and sm_80 without a GPU: no spills, the ARM's convs and
projection on tensor cores in the TF32 and half modes, at least 8 resident warps per SM."""
import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":  # jit functions are interpreted then, not compiled
    pytest.skip("the report compiles kernels; the interpreter run does not", allow_module_level=True)

from fastcomer import kernel_report  # noqa: E402

ARM_KERNELS = ("coverage_projection", "arm_backward", "arm_weight_grad")
# Few variants, to keep CI fast (each compile takes seconds): the ARM kernels, the heaviest,
# in the modes that must reach tensor cores; sm_80 in one mode.
MODES = {"sm_90": ("fp32", "bf16"), "sm_80": ("bf16",)}
MIN_WARPS_PER_SM = 8


@pytest.fixture(scope="module", params=sorted(MODES))
def small_report(request):
    arch = request.param
    select = lambda v: v.name.split()[0] in ARM_KERNELS and v.dtype in MODES[arch]
    return kernel_report.report(arch, "small", select=select, cuda=False)


def test_budgets_of_the_arm_kernels(small_report):
    kernels = small_report["kernels"]
    assert {(k["name"].split()[0], k["dtype"]) for k in kernels} == {
        (name, mode) for name in ARM_KERNELS for mode in MODES[small_report["arch"]]}
    for k in kernels:
        assert k["spill_store_bytes"] == k["spill_load_bytes"] == 0, f"{k['name']} spills: {k}"
        assert k["tensor_core_instructions"] > 0, f"{k['name']} has no tensor-core instructions"
        assert k["warps_per_sm"] >= MIN_WARPS_PER_SM, f"{k['name']}: {k['warps_per_sm']} warps per SM"
        assert k["registers"] <= 255 and k["ctas"] > 0 and k["flops"] > 0 and k["bytes"] > 0
        assert k["estimate_us"] > 0 and k["bound"] in ("compute", "memory")
    text = kernel_report.format_report(small_report)
    assert "ESTIMATES" in text and all(k["name"] in text for k in kernels)


@pytest.mark.parametrize("arch, registers, shared, warps, expected", [
    (90, 255, 0, 4, 8),  # 8 KB of registers per warp: 8 warps
    (90, 128, 0, 4, 16),
    (90, 32, 0, 4, 64),  # the warp limit
    (90, 32, 100 * 1024, 4, 8),  # shared memory: 2 CTAs of 101 KB in 228 KB
    (80, 32, 100 * 1024, 4, 4),  # 164 KB: 1 CTA
    (80, 64, 0, 1, 32),  # the CTA limit
])
def test_occupancy(arch, registers, shared, warps, expected):
    assert kernel_report.occupancy_warps(arch, registers, shared, warps) == expected


def test_sass_instruction_mix():
    sass = """
        /*0010*/                   HMMA.1684.F32.TF32 R4, R8, R12, R4 ;  /* 0x000000 */
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;  /* 0x000000 */
        /*0030*/                   FFMA R1, R2, R3, R1 ;  /* 0x000000 */
        /*0040*/                   STL.64 [R1+0x8], R4 ;  /* 0x000000 */
        /*0050*/                   STL [R1], R2 ;  /* 0x000000 */
        /*0060*/                   LDL.128 R4, [R1+0x10] ;  /* 0x000000 */
        /*0070*/                   FFMA.FTZ R1, R2, R3, R1 ;  /* 0x000000 */
    """
    assert kernel_report.sass_stats(sass) == {"tensor_core": 2, "tf32_tensor_core": 1, "ffma": 2,
                                              "spill_store_bytes": 12, "spill_load_bytes": 16}


def test_absent_variants_module_is_reported_not_fatal(monkeypatch):
    """An op without variants.py is "not provided"; a variants module whose own import fails raises."""
    from fastcomer.ops.registry import OPS, Op

    op = OPS["beam_scorer_step"]
    def import_fails(missing):
        def kernel_variants(self, shapes, arch):
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return kernel_variants

    monkeypatch.setattr(Op, "kernel_variants", import_fails(f"{op.package}.variants"))
    assert kernel_report._variants_of(op, "small", 90) is None
    monkeypatch.setattr(Op, "kernel_variants", import_fails("some_dependency"))
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        kernel_report._variants_of(op, "small", 90)


def test_bad_arch_raises():
    with pytest.raises(ValueError, match="arch"):
        kernel_report.report("sm_70", "small")


def test_command_is_registered():
    from fastcomer import cli

    assert cli.kernels in cli.COMMANDS


def test_per_call_totals_group_by_op_dtype_and_shape():
    kernel = dict(registers=64, spill_store_bytes=0, spill_load_bytes=0, shared_bytes=1024, warps=4, warps_per_sm=32,
                  tensor_core_instructions=1, ffma_instructions=0, ctas=8, flops=1e9, bytes=1e6, bound="memory",
                  launches=1, dtype="fp32", op="cross_attention_step")
    kernels = [dict(kernel, name=f"{role}[images=1,L=256,fp32]", estimate_us=2.0) for role in ("partial_attention", "merge")]
    kernels.append(dict(kernel, name="merge[images=16,L=256,fp32]", estimate_us=5.0))
    result = {"arch": "sm_90", "shapes": "published", "peaks": kernel_report.PEAKS[90], "providers": {},
              "kernels": kernels, "failed": [{"name": "refinement[images=1,L=256,bf16]", "error": "CompilationError: x"}]}
    text = kernel_report.format_report(result)
    assert "cross_attention_step fp32 images=1,L=256: 4 us" in text and "images=16,L=256: 5 us" in text
    assert "DOES NOT COMPILE: refinement[images=1,L=256,bf16]: CompilationError: x" in text


@pytest.mark.parametrize("arch", sorted(MODES))
def test_stored_report_covers_every_op_and_its_table_is_generated(arch):
    """benchmarks/results/kernel_report: every op's variants reported, the .txt table made by
    format_report from the JSON beside it."""
    import json

    from fastcomer.ops.registry import OPS
    from support.paths import REPO

    folder = REPO / "benchmarks" / "results" / "kernel_report"
    result = json.loads((folder / f"{arch}_published.json").read_text())
    assert result["providers"] == {name: "ok" for name in OPS}
    assert {k["op"].split(".")[0] for k in result["kernels"]} == set(OPS)
    assert (folder / f"{arch}_published.txt").read_text() == kernel_report.format_report(result) + "\n"
