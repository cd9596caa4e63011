"""The fused ops as torch.library custom ops, checked at the fake level on the CPU (shapes
only, no kernel runs): a patched decoder traces as one graph, with each fused cross-attention
one `fastcomer::arm_attention` node (and its backward one `arm_attention_backward` node), and
the engine's step on the kernel backends one node per op per layer (`fastcomer::self_attention_step`,
`cross_attention_step`, `feed_forward_step`). The
plain-PyTorch backend (patch(backend='torch')) traces into ordinary operations."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastcomer.modules
from fastcomer import patch
from fastcomer.ops.arm_attention import ARMWeights
from fastcomer.ops.arm_attention.custom_op import arm_attention_op
from fastcomer.ops.dispatch import DispatchPlan
from fastcomer.search.decoding_state import DecodingState

from support.compile_cases import TINY, graph_breaks, tiny_batch, tiny_model


class CapturedGraph(Exception):
    """Raised by `capture` once dynamo hands over a whole graph: nothing is run."""


def capture(fn, *args) -> torch.fx.GraphModule:
    """The one graph torch.compile(fullgraph=True) captures for fn(*args) (a graph break
    fails), without running it: the backend stops compilation once it has the graph."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        raise CapturedGraph

    torch._dynamo.reset()
    with pytest.raises(Exception) as caught:
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert graphs, f"no graph was captured: {caught.value!r}"
    return graphs[0]


def op_calls(gm: torch.fx.GraphModule, name: str) -> int:
    return sum(1 for node in gm.graph.nodes if node.op == "call_function" and name in str(node.target))


def decoder_inputs(model):
    img, img_mask, tgt = tiny_batch()
    with torch.no_grad():
        feature, mask = model.encoder(img, img_mask)
    return torch.cat((feature, feature)), torch.cat((mask, mask)), tgt


def test_patched_decoder_torch_backend_is_one_graph_and_matches_plain():
    model = tiny_model()
    inputs = decoder_inputs(model)
    with torch.no_grad():
        want = model.decoder(*inputs)
        patch(model, backend="torch")
        assert graph_breaks(model.decoder, *inputs) == 1
        got = torch.compile(model.decoder, backend="aot_eager", fullgraph=True)(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_patched_decoder_triton_backend_traces_the_custom_op(monkeypatch, training):
    """Every cross-attention (the first layer's without ARM too) is one arm_attention node."""
    monkeypatch.setattr(fastcomer.modules, "resolve", lambda *args, **kwargs: "triton")
    model = tiny_model().train(training)
    inputs = decoder_inputs(model)
    patch(model, backend="triton")
    gm = capture(model.decoder, *inputs)
    assert op_calls(gm, "fastcomer.arm_attention") == TINY["num_decoder_layers"]


def test_arm_attention_op_fake_forward_and_backward():
    """Shapes from the fake implementations; the autograd formula is the backward op."""
    b, nhead, t, h, w, hd = 2, 2, 3, 2, 3, 4
    arm = tiny_model(dc=4).decoder.model.arm.train()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q, k, v = (torch.randn(b * nhead, n, hd, requires_grad=True) for n in (t, h * w, h * w))
        prev = torch.rand(b * nhead, t, h * w, requires_grad=True)
        mask = torch.zeros(b, h * w, dtype=torch.bool)
        weights = ARMWeights.from_module(arm)
        weights = weights._replace(**{name: mode.from_tensor(getattr(weights, name)) for name in weights._fields[:8]})
        out, attn = arm_attention_op(q, k, v, mask, h, w, prev, weights, bn_training=True)
        assert out.shape == q.shape and attn.shape == (b * nhead, t, h * w) and attn.dtype == q.dtype
        grads = torch.autograd.grad((out.sum() + attn.sum()), (q, k, v, prev))
    assert [g.shape for g in grads] == [x.shape for x in (q, k, v, prev)]


def test_decoding_step_kernel_backends_are_one_node_per_op_per_layer():
    model = tiny_model()
    img, img_mask, _ = tiny_batch()
    with torch.no_grad():
        feature, mask = model.encoder(img, img_mask)
        b, h, w, _ = feature.shape
        plan = DispatchPlan((("self_attention_step", "triton"), ("cross_attention_step", "cuda"),
                             ("feed_forward_step", "triton"), ("beam_scorer_step", "triton")), torch.float32, False)
        state = DecodingState(model.decoder, b, 1, h, w, 4, feature.dtype, feature.device, plan)
        state.start(feature, mask, torch.tensor([1, 2]))
        gm = capture(state.step, 4)
    for op in ("self_attention_step", "cross_attention_step", "feed_forward_step"):
        assert op_calls(gm, f"fastcomer.{op}") == TINY["num_decoder_layers"], op
