"""The Triton decode-step kernel compiles to sm_80 and sm_90 machine code (Triton's own
ptxas, no GPU needed): catches what the interpreter accepts but the compiler does not."""
import pytest

triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as err:  # the offline-compile API moved: nothing to check with
    pytest.skip(f"this Triton lacks ASTSource/GPUTarget: {err}", allow_module_level=True)

from fastcomer.ops.decode_step.triton_kernel import _decode_step_kernel

FLAGS = ("REFINE", "UPDATE_CROSS", "UPDATE_SELF")
SIZES = ("DC", "BLOCK_L", "BLOCK_H", "BLOCK_D", "BLOCK_C")


def signature(dtype):
    types = {}
    for name in _decode_step_kernel.arg_names:
        if name in FLAGS or name in SIZES:
            types[name] = "constexpr"
        elif name == "mask_ptr":
            types[name] = "*u8"
        elif name == "image_index_ptr":
            types[name] = "*i64"
        elif name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr"):
            types[name] = f"*{dtype}"
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        else:
            types[name] = "i32"
    return types


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("flags,nhead,dtype", [
    ((True, True, True), 8, "fp32"),
    ((True, False, True), 2, "fp32"),
    ((True, True, False), 8, "bf16"),
    ((False, False, False), 16, "fp16"),
])
def test_kernel_compiles(arch, flags, nhead, dtype):
    constants = dict(zip(FLAGS, flags), DC=32, BLOCK_L=32, BLOCK_H=nhead, BLOCK_D=32, BLOCK_C=16)
    names = _decode_step_kernel.arg_names
    source = ASTSource(fn=_decode_step_kernel, signature=signature(dtype),
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
    assert compiled.asm["cubin"], "no cubin"
