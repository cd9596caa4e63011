"""The fused ARM attention kernels compile for NVIDIA GPUs (sm_80, sm_90) without one: Triton's
compiler and its bundled ptxas run on the CPU. Catches what the interpreter accepts and the
GPU compiler does not (constexpr rules, shared-memory budget) before a GPU machine sees it."""
import os

import pytest

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") == "1":  # jit functions are interpreted then, not compiled
    pytest.skip("compilation is checked outside the interpreter", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastcomer.ops.arm_attention import triton_kernels as K  # noqa: E402

SHARED_MEMORY_LIMIT = 160 * 1024  # sm_80 allows 163 KB per block, sm_90 227 KB


def arm_signature(names, pointers):
    ints = {"T", "L", "WIDTH", "HEIGHT", "H", "DC", "CIN", "N_CROSS", "D", "N", "seed"}
    sig = {}
    for name in names:
        sig[name] = pointers.get(name) or ("i32" if name in ints else "i64" if name == "rng_offset" else "fp32")
    return sig


def compile_kernel(fn, signature, constants, capability):
    names = list(signature) + list(constants)
    signature = dict(signature, **{k: "constexpr" for k in constants})
    constexprs = {(names.index(k),): v for k, v in constants.items()}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", capability, 32))


ARM_BLOCKS = dict(BLOCK_L=64, BLOCK_C=16, BLOCK_DC=32, BLOCK_H=16)


def cases():
    for dtype, precision in (("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "ieee"), ("bf16", "ieee")):
        attention_ptrs = {n: "*" + dtype for n in ("Q", "K", "V", "Out", "Attn", "DOut", "DAttn", "DK", "DV")}
        attention_ptrs.update({n: "*fp32" for n in ("Z", "Scale", "Shift", "Mean", "Lse", "DS", "DQ", "Stats", "DA")})
        attention_ptrs.update(Mask="*u8")
        blocks = dict(BLOCK_T=16, BLOCK_L=64, BLOCK_D=32)
        yield (K.attention_rows_kernel,
               arm_signature(["Q", "K", "V", "Z", "Scale", "Shift", "Mask", "Out", "Attn", "Lse", "T", "L", "D", "H", "seed",
                              "rng_offset", "p_drop"], attention_ptrs),
               dict(HAS_R=True, WRITE_OUT=True, WRITE_LSE=True, DROPOUT=True, PRECISION=precision,
                    **blocks))
        yield (K.attention_backward_rows_kernel,
               arm_signature(["Q", "K", "V", "Z", "Scale", "Shift", "Mean", "Mask", "DOut", "DAttn", "Lse", "DS", "DQ",
                              "Stats", "T", "L", "D", "H", "seed", "rng_offset", "p_drop"], attention_ptrs),
               dict(HAS_R=True, HAS_DATTN=True, DROPOUT=True, PRECISION=precision, **blocks))
        yield (K.unrefined_backward_rows_kernel,
               arm_signature(["Q", "K", "Mask", "DA", "Lse", "DS", "DQ", "T", "L", "D", "H", "seed", "p_drop"],
                             attention_ptrs),
               dict(DROPOUT=True, PRECISION=precision, **blocks))
        yield (K.attention_backward_keys_kernel,
               arm_signature(["Q", "DOut", "Attn", "DS", "DK", "DV", "T", "L", "D"], attention_ptrs),
               dict(PRECISION=precision, **blocks))
        arm_ptrs = {n: "*fp32" for n in ("Curr", "ConvW", "ConvB", "ProjW", "Z", "Stats", "DS", "CoefDZ", "DPrev",
                                         "DCurr", "DConvW", "DConvB", "DProjW")}
        arm_ptrs.update(Prev="*" + dtype, Mask="*u8", Relu="*i32")
        sizes = ["T", "L", "WIDTH", "HEIGHT", "H", "DC", "CIN", "N_CROSS"]
        yield (K.coverage_projection_kernel,
               arm_signature(["Prev", "Curr", "Mask", "ConvW", "ConvB", "ProjW", "Z", "Stats", "Relu"] + sizes, arm_ptrs),
               dict(STATS=True, WRITE_RELU=True, PRECISION=precision, **ARM_BLOCKS))
        yield (K.arm_backward_kernel,
               arm_signature(["Prev", "Curr", "Mask", "ConvW", "ConvB", "ProjW", "DS", "Z", "CoefDZ", "Relu", "DPrev",
                              "DCurr", "DConvW", "DConvB", "DProjW"] + sizes, arm_ptrs),
               dict(PRECISION=precision, **ARM_BLOCKS))


@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_within_shared_memory(capability):
    for fn, signature, constants in cases():
        compiled = compile_kernel(fn, signature, constants, capability)
        shared = compiled.metadata.shared
        assert shared <= SHARED_MEMORY_LIMIT, f"{fn.__name__} {constants}: {shared} bytes of shared memory"
