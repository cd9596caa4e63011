"""The decoding steps' custom ops (torch.ops.fastcomer.self_attention_step, feed_forward_step,
beam_scorer_step: the path torch.compile traces on the kernel backend) run for real on the
Triton backend through Triton's interpreter: the launchers read the layer and the lists the
ops rebuild from their tensors, with the entry's results and in-place updates, bitwise."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/run.sh sets it too)

import pytest

from support.step_op_cases import CASES, assert_same_call


@pytest.mark.parametrize("name", sorted(CASES))
def test_custom_op_equals_its_entry_on_triton(name):
    case = CASES[name]("triton")
    assert_same_call(case, case.op, case.op_args, case.updated[1])
