"""Per-step latency of one decoder layer's fused cross-attention + ARM step, per backend.

For each (images, L): all images x 20 rows (beam 10, both directions) take one refining
layer's step over the feature map of a published image (`fastcomer.shapes`: 8x32, L = 256, and
16x64, L = 1024) (cross and self coverage: refinement, the returned attention, both coverage
updates), on every backend that runs here: the subject is the CUDA kernel where it runs,
else Triton, the baselines the others (torch: the reference step). Beside each row, in its
details: the floor set by the bytes the step must move (K/V of every image, every row's
coverage sums read and written, prev_attn read, the returned attention written) over the
device's measured copy bandwidth. Each backend is a test of its own, timed by pytest-benchmark
in rounds of calls (`benchmarks/conftest.py`); a backend this machine cannot run is skipped.

    python -m pytest benchmarks/bench_cross_attention_step.py --bench-out step.json   # GPU, full grid
    python -m pytest benchmarks/bench_cross_attention_step.py --device cpu --smoke    # CPU check
"""
import pytest
import torch

from fastcomer.model.arm import AttentionRefinementModule
from fastcomer.ops.cross_attention_step import cross_attention_step
from fastcomer.shapes import DC, FEATURE_MAPS, HEAD_DIM, NHEAD, ROWS_PER_IMAGE

BENCHMARK = "cross_attention_step"
BACKENDS = ("cuda", "triton", "torch")  # the first that runs is the subject
CASES = [(images, feature_map) for feature_map in FEATURE_MAPS for images in (1, 8, 32)]
SMOKE_CASES = [(1, (4, 16)), (2, (4, 16))]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = SMOKE_CASES if metafunc.config.getoption("smoke") else CASES
        metafunc.parametrize("case", cases, ids=[f"images{i}-L{h * w}" for i, (h, w) in cases])


def make_step(images, rows_per_image, height, width, dtype, device):
    """The arguments of one refining layer's step over a height x width feature map; every other
    image has its last eighth of columns as padding."""
    g = torch.Generator().manual_seed(0)
    rows, length = images * rows_per_image, height * width
    arm = AttentionRefinementModule(NHEAD, DC, cross_coverage=True, self_coverage=True).eval()
    with torch.no_grad():
        folded = arm.fold()
    folded = folded._replace(**{name: getattr(folded, name).to(device) for name in ("conv_weight", "conv_bias", "proj_weight", "shift")})
    mask = torch.zeros(images, height, width, dtype=torch.bool)
    mask[1::2, :, -width // 8:] = True
    return dict(
        q=torch.randn(rows, NHEAD, HEAD_DIM, generator=g).to(device, dtype),
        k=torch.randn(images, NHEAD, length, HEAD_DIM, generator=g).to(device, dtype),
        v=torch.randn(images, NHEAD, length, HEAD_DIM, generator=g).to(device, dtype),
        key_padding_mask=mask.view(images, length).to(device),
        image_index=torch.arange(images, dtype=torch.int32).repeat_interleave(rows_per_image).to(device),
        height=height,
        arm=folded,
        coverage=torch.rand(rows, 2 * NHEAD, length, generator=g).to(device),
        prev_attn=torch.softmax(torch.randn(rows, NHEAD, length, generator=g), dim=-1).to(device),
    )


def bytes_moved(step) -> int:
    """What a step cannot avoid moving: K and V of every image read, every row's coverage sums
    read and written back, prev_attn read and the returned attention (as large) written."""
    size = lambda name: step[name].numel() * step[name].element_size()
    return size("k") + size("v") + 2 * size("coverage") + 2 * size("prev_attn")


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_cross_attention_step(case, backend, device, dtype, smoke, bandwidth, benchmark, record):
    images, (height, width) = case
    step = make_step(images, ROWS_PER_IMAGE // 10 if smoke else ROWS_PER_IMAGE, height, width, dtype, device)
    rows, length = step["q"].shape[0], height * width
    name = f"images={images} rows={rows} L={length}"
    try:
        cross_attention_step(**step, backend=backend)
    except (RuntimeError, ValueError) as err:  # a backend this machine cannot run
        record.unavailable(BENCHMARK, name, backend, str(err))
    params = dict(images=images, rows=rows, length=length, height=height, width=width, nhead=NHEAD, head_dim=HEAD_DIM,
                  dc=DC, dtype=str(dtype).replace("torch.", ""), coverage="cross+self, refining layer")
    record(BENCHMARK, name, backend, BACKENDS, params,
           details=dict(bytes_moved=bytes_moved(step), copy_bandwidth_gb_s=bandwidth / 1e9,
                        bytes_floor_s=bytes_moved(step) / bandwidth))
    benchmark(cross_attention_step, **step, backend=backend)
