"""Triton's interpreter (3.9) multiplies bfloat16 tl.dot operands as the raw uint16 it stores
them in; `exact_bfloat16_dot` makes it multiply their values, as a GPU does, so that a
bfloat16 model's kernels can be checked on the CPU."""
import numpy as np
import triton.language as tl
from triton.runtime import interpreter


def _values(handle):
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    # a bfloat16 is the high half of the float32 of the same value
    return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def exact_bfloat16_dot(monkeypatch) -> None:
    dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, _values(a), _values(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
