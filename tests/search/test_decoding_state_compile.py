"""The engine's incremental decoder step under torch.compile and torch.export: one graph,
compiled steps equal eager ones (caches updated in place as in eager), and the exported
step (fastcomer.export.IncrementalDecoderStep, caches as inputs and outputs) matching
DecodingState.step over several steps."""

import torch

from fastcomer.export import export_modules
from fastcomer.search.decoding_state import DecodingState
from fastcomer.ops.dispatch import DispatchPlan

from support.compile_cases import graph_breaks, tiny_batch, tiny_model

MAX_LEN = 6


def started_state(model, backend="torch"):
    img, img_mask, _ = tiny_batch()
    with torch.no_grad():
        feature, mask = model.encoder(img, img_mask)
    b, h, w, _ = feature.shape
    state = DecodingState(model.decoder, b, 1, h, w, MAX_LEN, feature.dtype, feature.device,
                          DispatchPlan.of(backend, feature.dtype, False))
    state.start(feature, mask, torch.tensor([1, 2]))
    return state


def run_steps(step, state, steps=3):
    """Logits of `steps` steps, appending tokens chosen from them (state updated in place)."""
    logits = []
    for _ in range(steps):
        logits.append(step(MAX_LEN))
        state.append(logits[-1].argmax(-1))
    return logits


@torch.no_grad()
def test_step_is_one_graph():
    state = started_state(tiny_model())
    assert graph_breaks(state.step, MAX_LEN) == 1


@torch.no_grad()
def test_compiled_step_matches_eager():
    model = tiny_model()
    eager, compiled = started_state(model), started_state(model)
    want = run_steps(eager.step, eager)
    got = run_steps(torch.compile(compiled.step, backend="aot_eager", fullgraph=True), compiled)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.self_keys, eager.self_keys)
    torch.testing.assert_close(compiled.self_values, eager.self_values)
    torch.testing.assert_close(compiled.coverage, eager.coverage)


@torch.no_grad()
def test_exported_step_matches_engine():
    model = tiny_model()
    img, img_mask, _ = tiny_batch()
    graphs = export_modules(model, batch=2, image_size=tuple(img.shape[2:]), max_len=MAX_LEN)
    encoder = torch.export.export(graphs.encoder, (img, img_mask)).module()
    step = torch.export.export(graphs.step, graphs.example_step).module()
    state = started_state(model)
    memory_kv, memory_mask = encoder(img, img_mask)
    torch.testing.assert_close(memory_kv, state.memory_kv, rtol=1e-6, atol=1e-6)
    assert torch.equal(memory_mask, state.memory_mask)
    tokens = state.tokens.clone()
    caches = graphs.step.initial_caches()
    for position in range(3):
        want = state.step(MAX_LEN)
        logits, *caches = step(tokens, torch.tensor(position), memory_kv, memory_mask, *caches)
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
        chosen = want.argmax(-1)
        state.append(chosen)
        tokens[:, position + 1] = chosen
    for cache, kept in zip(caches, (state.self_keys, state.self_values, state.coverage)):
        torch.testing.assert_close(cache, kept, rtol=1e-5, atol=1e-6)
