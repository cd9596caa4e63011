"""Latency of one whole beam-search step (embedding, every decoder layer with the fused
cross-attention + ARM step, logits, log-softmax, top-k, finished lists, reorder), replayed as
CUDA graphs (the subject, on CUDA) and launched eagerly (the baseline), on the published CoMER
configuration with seeded random weights.

For each (images, image shape): a SearchSlots of `images` images x 20 rows (beam 10, both
directions) is started on random images of a published shape (`fastcomer.shapes`: 128x512, whose
feature map holds L = 256 positions, and 256x1024, L = 1024), then timed one step per round
(pytest-benchmark's pedantic mode: a step advances the search's state) over steps whose prefix
window is 64 positions (the steps of a mid-length expression; the timed steps share that
window, so their count is bounded). Each mode is a test of its own. In each row's details: the floor
set by the bytes a step must move (decoder weights, every image's K/V per layer, every row's
coverage sums read and written, the self-attention cache's window) over the device's
measured copy bandwidth.

    python -m pytest benchmarks/bench_beam_step.py --bench-out beam_step.json    # GPU
    python -m pytest benchmarks/bench_beam_step.py --device cpu --smoke           # CPU check
"""
import pytest
import torch

from fastcomer.benchmarking import bench_model
from fastcomer.ops.dispatch import decoding_plan
from fastcomer.search.options import SearchOptions
from fastcomer.search.search_slots import FeatureLayout, SearchSlots
from fastcomer.shapes import BEAM_SIZE, DIRECTIONS, IMAGE_SHAPES, MAX_LEN, PUBLISHED, feature_map

BENCHMARK = "beam_step"
MODES = ("graphs", "eager")  # the first measured is the subject; graphs need CUDA
WINDOW = 64
WARMUP, CALLS = 5, 40  # below WINDOW - 1 together: the timed steps share one window
CASES = [(images, shape) for shape in IMAGE_SHAPES for images in (1, 8, 32)]
SMOKE_CASES = [(1, (64, 256))]
MODEL = (f"CoMER() published config (d {PUBLISHED.d_model}, {PUBLISHED.nhead} heads, {PUBLISHED.num_decoder_layers} "
         f"layers, dc {PUBLISHED.dc}), seeded random weights")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = SMOKE_CASES if metafunc.config.getoption("smoke") else CASES
        metafunc.parametrize("case", cases, ids=[f"images{i}-L{h * w // 256}" for i, (h, w) in cases])


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


@pytest.mark.parametrize("mode", MODES)
@torch.inference_mode()
def test_beam_step(case, mode, device, smoke, model, bandwidth, benchmark, record):
    images, shape = case
    height, width = feature_map(shape)
    name = f"images={images} L={height * width}"
    if mode == "graphs" and device.type != "cuda":
        record.unavailable(BENCHMARK, name, mode, "CUDA graphs need a CUDA device")
    img = torch.rand(images, 1, *shape, device=device)
    feature, mask = model.encoder(img, torch.zeros(images, *shape, dtype=torch.bool, device=device))
    plan = decoding_plan(model.decoder, feature, graphs=mode == "graphs")
    layout = FeatureLayout(height, width, feature.dtype, device, plan)
    batch = SearchSlots(model.decoder, DIRECTIONS * images, SearchOptions(BEAM_SIZE, MAX_LEN), layout)
    batch.start(feature, mask)
    params = dict(images=images, rows=batch.state.rows, length=height * width, height=height, width=width,
                  beam_size=BEAM_SIZE, directions=DIRECTIONS, max_len=MAX_LEN, window=WINDOW,
                  kernels=dict(plan.backends), dtype="float32", model=MODEL)
    record(BENCHMARK, name, mode, MODES, params,
           details=dict(floor_bytes=floor_bytes(batch), copy_bandwidth_gb_s=bandwidth / 1e9,
                        bytes_floor_s=floor_bytes(batch) / bandwidth))
    benchmark.pedantic(batch.run, args=(WINDOW,), rounds=2 if smoke else CALLS, warmup_rounds=1 if smoke else WARMUP)
