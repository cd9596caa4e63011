"""Benchmark of the fused ARM cross-attention (fastcomer.ops.arm_attention).

One ARM cross-attention layer (a layer j > 0: refined by the ARM with both coverages) and the
whole CoMER decoder (3 layers), published config (`fastcomer.shapes`: d_model 256, nhead 8, dc 32),
16 sequences, T in {32, 64, 128}, (h, w) in {(8, 32), (16, 64), (16, 78)} (the published images'
feature maps, and one whose width is no multiple of 16), forward and forward+backward;
the subject `fused` (the Triton kernels, fastcomer.patch) against:
  eager     the plain path (fastcomer.model), PyTorch eager
  compiled  torch.compile of the plain path (not in --smoke: compiling is slow and not the point)
  composite what a user would write: A by matmul + softmax, the ARM through cuDNN conv,
            then F.scaled_dot_product_attention with -R as an additive bias (layer only; it
            does not return the refined attention the next layer needs, so it does less work)
Each row's checks hold every variant's largest error relative to eager (forward in eval
mode, where all compute the same function); its details the peak memory (CUDA), the achieved
TFLOP/s (useful FLOPs of the cross-attention: QK^T twice, PV, the 5x5 conv and the 1x1
projection per ARM layer; the decoder's other layers are not counted; backward counted as
twice the forward) and the measured peak of a large matmul in the same dtype. Each variant is a
test of its own, timed by pytest-benchmark (`benchmarks/conftest.py`).

    python -m pytest benchmarks/bench_arm_attention.py --bench-out arm.json [--train] [--dtype bfloat16]   # GPU
    TRITON_INTERPRET=1 python -m pytest benchmarks/bench_arm_attention.py --device cpu --smoke -k layer    # CPU check
"""
import functools

import pytest
import torch
import torch.nn.functional as F

from fastcomer.benchmarking import measure
from fastcomer.model.arm import KERNEL_SIZE, AttentionRefinementModule
from fastcomer.model.attention import MultiheadAttention, masked_softmax
from fastcomer.model.decoder import Decoder
from fastcomer.modules import FusedARMAttention
from fastcomer.patch import patch
from fastcomer.shapes import D_MODEL, DC, DECODER_LAYERS as LAYERS, FEATURE_MAPS, FEEDFORWARD as FFN, NHEAD
from fastcomer.shapes import TRAIN_BATCH as BATCH

BENCHMARK = "arm_attention"
CASES = [(t, h, w) for t in (32, 64, 128) for h, w in (*FEATURE_MAPS, (16, 78))]
SMOKE_BATCH, SMOKE_CASES = 2, [(3, 3, 5)]
MODES = ("forward", "forward_backward")
VARIANTS = ("fused", "eager", "composite", "compiled")  # the subject first


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = SMOKE_CASES if metafunc.config.getoption("smoke") else CASES
        metafunc.parametrize("case", cases, ids=[f"T{t}-{h}x{w}" for t, h, w in cases])


def padding_mask(batch, h, w):
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    mask[batch // 2:, :, w - w // 4:] = True  # half the batch padded on the right
    return mask


class LayerCase:
    """Layer j > 0 of the decoder: query [b, t, d], memory [b, L, d], the previous layer's attention."""

    def __init__(self, batch, t, h, w, device, dtype, requires_grad):
        g = torch.Generator().manual_seed(0)
        self.batch, self.h = batch, h
        self.attn = MultiheadAttention(D_MODEL, NHEAD).to(device, dtype)
        self.arm = AttentionRefinementModule(NHEAD, DC, True, True).to(device, dtype)
        self.fused = FusedARMAttention.from_module(self.attn, backend="triton")
        self.query = torch.randn(batch, t, D_MODEL, generator=g).to(device, dtype).requires_grad_(requires_grad)
        self.memory = torch.randn(batch, h * w, D_MODEL, generator=g).to(device, dtype).requires_grad_(requires_grad)
        self.mask = padding_mask(batch, h, w).view(batch, h * w).to(device)
        self.prev = torch.softmax(torch.randn(batch * NHEAD, t, h * w, generator=g), -1).to(device, dtype)
        self.prev.requires_grad_(requires_grad)
        self.modules = (self.attn, self.arm)

    def arm_partial(self):
        return functools.partial(self.arm, self.prev, self.mask, self.h)

    def eager(self):
        return self.attn(self.query, self.memory, self.mask, None, self.arm_partial())[0]

    def fused_call(self):
        return self.fused(self.query, self.memory, self.mask, None, self.arm_partial())[0]

    def composite(self):
        attn, n, b = self.attn, NHEAD, self.batch
        q = attn.split_heads(attn.project_query(self.query))
        k, v = (attn.split_heads(x) for x in attn.project_key_value(self.memory))
        a = masked_softmax(torch.bmm(q, k.transpose(1, 2)), self.mask, None, n)
        r = self.arm(self.prev, self.mask, self.h, a)
        bias = (-r).view(b, n, *r.shape[1:]).masked_fill(self.mask[:, None, None], float("-inf"))
        out = F.scaled_dot_product_attention(q.view(b, n, *q.shape[1:]), k.view(b, n, *k.shape[1:]),
                                             v.view(b, n, *v.shape[1:]), attn_mask=bias, scale=1.0)
        return attn.out_proj(out.transpose(1, 2).reshape(b, -1, D_MODEL))


class DecoderCase:
    """The whole decoder, plain and patched, with the same weights."""

    def __init__(self, batch, t, h, w, device, dtype, requires_grad):
        torch.manual_seed(0)
        self.plain = Decoder(D_MODEL, NHEAD, LAYERS, FFN, 0.0, DC, True, True).to(device, dtype)
        self.patched = patch(Decoder(D_MODEL, NHEAD, LAYERS, FFN, 0.0, DC, True, True).to(device, dtype), backend="triton")
        self.patched.load_state_dict(self.plain.state_dict())
        self.feature = torch.randn(batch, h, w, D_MODEL).to(device, dtype).requires_grad_(requires_grad)
        self.mask = padding_mask(batch, h, w).to(device)
        self.tgt = torch.randint(3, 100, (batch, t)).to(device)
        self.modules = (self.plain, self.patched)

    def eager(self):
        return self.plain(self.feature, self.mask, self.tgt)

    def fused_call(self):
        return self.patched(self.feature, self.mask, self.tgt)


def layer_flops(batch, t, length):
    head_dim = D_MODEL // NHEAD
    attention = 3 * 2 * batch * NHEAD * t * length * head_dim  # QK^T (unrefined and refined passes), PV
    arm = 2 * batch * t * length * DC * (2 * NHEAD * KERNEL_SIZE**2 + NHEAD)  # conv on 2*nhead channels, 1x1 projection
    return attention + arm


def peak_mib(fn, device):
    """MiB allocated by one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


@pytest.fixture(scope="module")
def peak_tflops(device, dtype):
    """Measured peak: a large matmul in the benchmark's dtype (tf32 when enabled); None on CPU."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / measure(lambda: a @ b) / 1e12


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", ["layer", "decoder"])
def test_arm_attention(level, mode, variant, case, device, dtype, smoke, pytestconfig, peak_tflops, benchmark, record):
    if variant == "composite" and level != "layer":
        pytest.skip("the SDPA composite is one layer's")
    if variant == "compiled" and smoke:
        pytest.skip("not in --smoke: compiling is slow and not the point")
    t, h, w = case
    batch, train, grad = SMOKE_BATCH if smoke else BATCH, pytestconfig.getoption("train"), mode == "forward_backward"
    bench = (LayerCase if level == "layer" else DecoderCase)(batch, t, h, w, device, dtype, grad)
    for module in bench.modules:
        module.train(train)
    call = {"fused": bench.fused_call, "eager": bench.eager, "composite": getattr(bench, "composite", None),
            "compiled": torch.compile(bench.eager) if variant == "compiled" else None}[variant]
    checks = {}
    if not grad and not train:  # in eval mode every variant computes the same function: checked before timing
        with torch.no_grad():
            expected = bench.eager().double()
            error = ((call().double() - expected).abs().max() / expected.abs().max()).item()
        exact = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
        assert error < (1e-4 if exact else 2e-2), error  # float32, else tf32/half rounding
        checks["max_rel_err_vs_eager"] = {variant: error}

    def run():
        out = call()
        if grad:
            out.float().square().mean().backward()

    flops = layer_flops(batch, t, h * w)
    if level == "decoder":  # layer 0 has no ARM: QK^T and PV once
        flops = (LAYERS - 1) * flops + 2 * 2 * batch * NHEAD * t * h * w * (D_MODEL // NHEAD)
    flops *= 3 if grad else 1
    name = f"{level} {mode} T={t} {h}x{w} batch={batch}{' train' if train else ''}"
    params = dict(level=level, mode=mode, batch=batch, T=t, h=h, w=w, L=h * w, d_model=D_MODEL, nhead=NHEAD, dc=DC,
                  decoder_layers=LAYERS, dtype=str(dtype).replace("torch.", ""), tf32=torch.backends.cuda.matmul.allow_tf32,
                  train=train)
    record(BENCHMARK, name, variant, VARIANTS, params, checks)  # the group, before timing
    with torch.enable_grad() if grad else torch.no_grad():
        if smoke:  # one call (pytest-benchmark's calibration takes three): the interpreter is slow
            benchmark.pedantic(run, rounds=1)
        else:
            benchmark(run)
        peak_memory = peak_mib(run, device)
    if benchmark.stats:  # None under --benchmark-disable
        tflops = flops / benchmark.stats.stats.median / 1e12
        record(BENCHMARK, name, variant, VARIANTS, params, checks,
               details=dict(flops=flops, tflops={variant: tflops}, peak_mib={variant: peak_memory},
                            measured_peak_tflops=peak_tflops,
                            fraction_of_peak={variant: tflops / peak_tflops} if peak_tflops else None,
                            flops_note="useful FLOPs: QK^T twice, PV, 5x5 conv, 1x1 projection per ARM layer; "
                                       "backward = 2x forward"))
