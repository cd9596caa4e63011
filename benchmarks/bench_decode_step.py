"""Per-step latency of one decoder layer's fused cross-attention + ARM step, per backend.

For each (images, L): all images x 20 rows (beam 10, both directions) take one refining
layer's step (cross and self coverage: refinement, the returned attention, both coverage
updates), on every backend that runs here: the subject is the CUDA kernel where it runs,
else Triton, the baselines the others (torch: the reference step). Beside each row, in its
details: the floor set by the bytes the step must move (K/V of every image, every row's
coverage sums read and written, prev_attn read, the returned attention written) over the
device's measured copy bandwidth.

    python -m pytest benchmarks/bench_decode_step.py --bench-out decode_step.json    # GPU, full grid
    python -m pytest benchmarks/bench_decode_step.py --device cpu --smoke             # CPU check
"""
import torch

from fastcomer.benchmarking import make_row, measure
from fastcomer.model.arm import AttentionRefinementModule
from fastcomer.ops.cross_attention_step import cross_attention_step

NHEAD, HEAD_DIM, DC, HEIGHT, ROWS_PER_IMAGE = 8, 32, 32, 16, 20
BACKENDS = ("cuda", "triton", "torch")  # the first that runs is the subject
CASES = [(images, length) for length in (256, 1024) for images in (1, 8, 32)]
SMOKE_CASES = [(1, 64), (2, 64)]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = SMOKE_CASES if metafunc.config.getoption("smoke") else CASES
        metafunc.parametrize("case", cases, ids=[f"images{i}-L{length}" for i, length in cases])


def make_step(images, rows_per_image, length, dtype, device):
    """The arguments of one refining layer's step; every other image has its last eighth of
    columns as padding."""
    g = torch.Generator().manual_seed(0)
    rows, height = images * rows_per_image, HEIGHT if length % HEIGHT == 0 else 1
    arm = AttentionRefinementModule(NHEAD, DC, cross_coverage=True, self_coverage=True).eval()
    with torch.no_grad():
        folded = arm.fold()
    folded = folded._replace(**{name: getattr(folded, name).to(device) for name in ("conv_weight", "conv_bias", "proj_weight", "shift")})
    mask = torch.zeros(images, height, length // height, dtype=torch.bool)
    mask[1::2, :, -(length // height) // 8:] = True
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


@torch.no_grad()
def test_decode_step(case, device, dtype, smoke, bandwidth, add_row):
    images, length = case
    step = make_step(images, ROWS_PER_IMAGE // 10 if smoke else ROWS_PER_IMAGE, length, dtype, device)
    medians, unavailable = {}, {}
    for backend in BACKENDS:
        try:
            medians[backend], _ = measure(lambda: cross_attention_step(**step, backend=backend),
                                          calls=2 if smoke else None)
        except (RuntimeError, ValueError) as err:  # a backend this machine cannot run
            unavailable[backend] = str(err)
    assert medians, f"no backend runs here: {unavailable}"
    floor_s = bytes_moved(step) / bandwidth
    rows = step["q"].shape[0]
    params = dict(images=images, rows=rows, length=length, height=step["height"], width=length // step["height"],
                  nhead=NHEAD, head_dim=HEAD_DIM, dc=DC, dtype=str(dtype).replace("torch.", ""),
                  coverage="cross+self, refining layer")
    subject = next(backend for backend in BACKENDS if backend in medians)
    add_row(make_row("decode_step", f"images={images} rows={rows} L={length}", params, subject, medians,
                     details=dict(bytes_moved=bytes_moved(step), copy_bandwidth_gb_s=bandwidth / 1e9,
                                  bytes_floor_s=floor_s, unavailable=unavailable)))
