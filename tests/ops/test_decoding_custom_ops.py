"""The decoding steps' custom ops (`<op>/custom_op.py`: self_attention_step, feed_forward_step,
beam_scorer_step) on random inputs, on the CPU with the torch backend: each op equals its
entry (results and in-place updates, bitwise: the op rebuilds the layer or the lists and calls
the entry), passes torch.library.opcheck (schema, fake implementation, functionalization), and
compiles with fullgraph=True, as the op node and through its engine wrapper."""
import copy

import pytest
import torch

from support.step_op_cases import CASES, assert_same_call

@pytest.mark.parametrize("name", sorted(CASES))
def test_custom_op_equals_its_entry(name):
    case = CASES[name]()
    assert_same_call(case, case.op, case.op_args, case.updated[1])


@pytest.mark.parametrize("name", sorted(CASES))
def test_custom_op_passes_opcheck(name):
    case = CASES[name]()
    torch.library.opcheck(case.op.default, copy.deepcopy(case.op_args))


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_custom_op_and_wrapper_equal_the_entry(name):
    """torch.compile(fullgraph=True) of one op call (one node of the graph) and of its engine
    wrapper on the torch backend (inlined: the entry's operations), each equal to the entry."""
    case = CASES[name]()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled_op = torch.compile(lambda *args: case.op(*args), backend=recording_backend, fullgraph=True)
    assert_same_call(case, compiled_op, case.op_args, case.updated[1])
    calls = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert [call for call in calls if "getitem" not in call] == [f"fastcomer.{name}"], calls
    compiled_wrapper = torch.compile(lambda *args: case.wrapper(*args, backend="torch"), backend="aot_eager",
                                     fullgraph=True)
    assert_same_call(case, compiled_wrapper, case.entry_args, case.updated[0])
