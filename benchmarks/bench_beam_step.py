"""Latency of one whole beam-search step (embedding, every decoder layer with the fused
cross-attention + ARM step, logits, log-softmax, top-k, finished lists, reorder), replayed as
CUDA graphs (the subject, on CUDA) and launched eagerly (the baseline), on the published CoMER
configuration with seeded random weights.

For each (images, L): a SearchSlots of `images` images x 20 rows (beam 10, both directions)
is started on random images whose feature map is 16 x L/16, then timed one step per sample
over steps whose prefix window is 64 positions (the steps of a mid-length expression; the
timed steps share that window, so their count is bounded). In each row's details: the floor
set by the bytes a step must move (decoder weights, every image's K/V per layer, every row's
coverage sums read and written, the self-attention cache's window) over the device's
measured copy bandwidth.

    python -m pytest benchmarks/bench_beam_step.py --bench-out beam_step.json    # GPU
    python -m pytest benchmarks/bench_beam_step.py --device cpu --smoke           # CPU check
"""
import pytest
import torch

from fastcomer.benchmarking import bench_model, make_row, measure
from fastcomer.ops.dispatch import decoding_plan
from fastcomer.search.options import SearchOptions
from fastcomer.search.search_slots import FeatureLayout, SearchSlots

WINDOW, HEIGHT, BEAM_SIZE, MAX_LEN = 64, 16, 10, 200
WARMUP, CALLS = 5, 40  # below WINDOW - 1 together: the timed steps share one window
CASES = [(images, length) for length in (256, 1024) for images in (1, 8, 32)]
SMOKE_CASES = [(1, 64)]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = SMOKE_CASES if metafunc.config.getoption("smoke") else CASES
        metafunc.parametrize("case", cases, ids=[f"images{i}-L{length}" for i, length in cases])


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def floor_bytes(batch: SearchSlots) -> int:
    state = batch.state
    weights = sum(tensor_bytes(p) for p in state.decoder.parameters())
    coverage = 2 * tensor_bytes(state.coverage) if state.coverage is not None else 0
    self_kv = (tensor_bytes(state.self_keys) + tensor_bytes(state.self_values)) * WINDOW // state.max_len
    return weights + tensor_bytes(state.memory_kv) + coverage + self_kv


@pytest.fixture(scope="module")
def model(device):
    return bench_model(0, str(device))


@torch.inference_mode()
def test_beam_step(case, device, smoke, model, bandwidth, add_row):
    images, length = case
    width = length // HEIGHT
    img = torch.rand(images, 1, HEIGHT * 16, width * 16, device=device)
    feature, mask = model.encoder(img, torch.zeros(images, HEIGHT * 16, width * 16, dtype=torch.bool, device=device))
    modes = ("graphs", "eager") if device.type == "cuda" else ("eager",)  # graphs need CUDA
    medians = {}
    for mode in modes:
        plan = decoding_plan(model.decoder, feature, graphs=mode == "graphs")
        layout = FeatureLayout(HEIGHT, width, feature.dtype, device, plan)
        batch = SearchSlots(model.decoder, 2 * images, SearchOptions(BEAM_SIZE, MAX_LEN), layout)
        batch.start(feature, mask)
        medians[mode], _ = measure(lambda: batch.run(WINDOW), calls=2 if smoke else CALLS, warmup=1 if smoke else WARMUP)
    params = dict(images=images, rows=batch.state.rows, length=length, height=HEIGHT, width=width, beam_size=BEAM_SIZE,
                  directions=2, max_len=MAX_LEN, window=WINDOW, kernels=dict(plan.backends), dtype="float32",
                  model="CoMER() published config (d 256, 8 heads, 3 layers, dc 32), seeded random weights")
    add_row(make_row("beam_step", f"images={images} L={length}", params, modes[0], medians,
                     details=dict(floor_bytes=floor_bytes(batch), copy_bandwidth_gb_s=bandwidth / 1e9,
                                  bytes_floor_s=floor_bytes(batch) / bandwidth)))
