"""Benchmark of the fused ARM cross-attention (fastcomer.ops.arm_attention).

One ARM cross-attention layer (a layer j > 0: refined by the ARM with both coverages) and the
whole CoMER decoder (3 layers), published config (d_model 256, nhead 8, dc 32), 16 sequences,
T in {32, 64, 128}, (h, w) in {(8, 32), (16, 64), (16, 78)}, against:
  eager     the plain path (fastcomer.model), PyTorch eager
  compiled  torch.compile of the plain path
  composite what a user would write: A by matmul + softmax, the ARM through cuDNN conv,
            then F.scaled_dot_product_attention with -R as an additive bias (layer only; it
            does not return the refined attention the next layer needs, so it does less work)
  fused     the Triton kernels (fastcomer.patch)
Reports median forward and forward+backward times, peak memory, achieved TFLOP/s (useful
FLOPs of the cross-attention: QK^T twice, PV, the 5x5 conv and the 1x1 projection per ARM
layer; the decoder's other layers are not counted; backward counted as twice the forward) against the measured peak of a large matmul in the same dtype, and writes JSON.

    python benchmarks/bench_arm_attention.py --out bench.json                    # on a GPU
    TRITON_INTERPRET=1 python benchmarks/bench_arm_attention.py --smoke --out smoke.json   # CPU check
"""
import argparse
import datetime
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastcomer  # noqa: E402
from fastcomer.model.decoder import Decoder  # noqa: E402
from fastcomer.modules import FusedARMAttention  # noqa: E402

D_MODEL, NHEAD, DC, FFN, LAYERS, BATCH = 256, 8, 32, 1024, 3, 16
SEQ_LENS = (32, 64, 128)
IMAGES = ((8, 32), (16, 64), (16, 78))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bench(fn, device, reps):
    """Median milliseconds and peak memory (MiB above what was allocated before; None on CPU)."""
    if device.type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return triton.testing.do_bench(fn, return_mode="median"), peak
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), None


def peak_tflops(device, dtype):
    """Measured peak: a large matmul in the benchmark's dtype (tf32 when enabled)."""
    if device.type != "cuda":
        return None
    import triton.testing

    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * n**3 / ms / 1e9


def layer_flops(t, L):
    head_dim = D_MODEL // NHEAD
    attention = 3 * 2 * BATCH * NHEAD * t * L * head_dim  # QK^T (unrefined and refined passes), PV
    arm = 2 * BATCH * t * L * DC * (2 * NHEAD * 25 + NHEAD)  # 5x5 conv on 2*nhead channels, 1x1 projection
    return attention + arm


class LayerCase:
    """Layer j > 0 of the decoder: query [b, t, d], memory [b, L, d], the previous layer's attention."""

    def __init__(self, t, h, w, device, dtype, requires_grad):
        g = torch.Generator().manual_seed(0)
        L = h * w
        self.attn = fastcomer.model.attention.MultiheadAttention(D_MODEL, NHEAD).to(device, dtype)
        self.arm = fastcomer.model.arm.AttentionRefinementModule(NHEAD, DC, True, True).to(device, dtype)
        self.fused = FusedARMAttention.from_module(self.attn, backend="triton")
        self.query = torch.randn(BATCH, t, D_MODEL, generator=g).to(device, dtype).requires_grad_(requires_grad)
        self.memory = torch.randn(BATCH, L, D_MODEL, generator=g).to(device, dtype).requires_grad_(requires_grad)
        mask = torch.zeros(BATCH, h, w, dtype=torch.bool)
        mask[BATCH // 2 :, :, w - w // 4 :] = True  # half the batch padded on the right
        self.mask = mask.view(BATCH, L).to(device)
        self.prev = torch.softmax(torch.randn(BATCH * NHEAD, t, L, generator=g), -1).to(device, dtype)
        self.prev.requires_grad_(requires_grad)
        self.h = h

    def arm_partial(self):
        return functools.partial(self.arm, self.prev, self.mask, self.h)

    def eager(self):
        return self.attn(self.query, self.memory, self.mask, None, self.arm_partial())

    def fused_call(self):
        return self.fused(self.query, self.memory, self.mask, None, self.arm_partial())

    def composite(self):
        import torch.nn.functional as F

        attn, n = self.attn, NHEAD
        q = attn.split_heads(attn.project_query(self.query))
        k, v = (attn.split_heads(x) for x in attn.project_key_value(self.memory))
        a = fastcomer.model.attention.masked_softmax(torch.bmm(q, k.transpose(1, 2)), self.mask, None, n)
        r = self.arm(self.prev, self.mask, self.h, a)
        bias = (-r).view(BATCH, n, *r.shape[1:]).masked_fill(self.mask[:, None, None], float("-inf"))
        out = F.scaled_dot_product_attention(q.view(BATCH, n, *q.shape[1:]), k.view(BATCH, n, *k.shape[1:]),
                                             v.view(BATCH, n, *v.shape[1:]), attn_mask=bias, scale=1.0)
        return attn.out_proj(out.transpose(1, 2).reshape(BATCH, -1, D_MODEL)), None


class DecoderCase:
    def __init__(self, t, h, w, device, dtype, requires_grad):
        torch.manual_seed(0)
        self.plain = Decoder(D_MODEL, NHEAD, LAYERS, FFN, 0.0, DC, True, True).to(device, dtype)
        self.patched = fastcomer.patch(Decoder(D_MODEL, NHEAD, LAYERS, FFN, 0.0, DC, True, True).to(device, dtype),
                                       backend="triton")
        self.patched.load_state_dict(self.plain.state_dict())
        self.feature = torch.randn(BATCH, h, w, D_MODEL).to(device, dtype).requires_grad_(requires_grad)
        mask = torch.zeros(BATCH, h, w, dtype=torch.bool)
        mask[BATCH // 2 :, :, w - w // 4 :] = True
        self.mask = mask.to(device)
        self.tgt = torch.randint(3, 100, (BATCH, t)).to(device)

    def eager(self):
        return self.plain(self.feature, self.mask, self.tgt), None

    def fused_call(self):
        return self.patched(self.feature, self.mask, self.tgt), None


def run_case(case_cls, t, h, w, device, dtype, variants, reps, train):
    results = {}
    for mode in ("forward", "forward_backward"):
        grad = mode == "forward_backward"
        case = case_cls(t, h, w, device, dtype, grad)
        if train:
            for module in ("attn", "arm", "plain", "patched"):
                if hasattr(case, module):
                    getattr(case, module).train()
        calls = {"eager": case.eager, "fused": case.fused_call}
        if hasattr(case, "composite"):
            calls["composite"] = case.composite
        if "compiled" in variants:
            calls["compiled"] = torch.compile(case.eager)
        if not grad:
            # In eval mode every variant computes the same function: check it before timing.
            with torch.no_grad():
                expected = calls["eager"]()[0].double() if not train else None
                for name in variants:
                    if name in calls and expected is not None:
                        err = (calls[name]()[0].double() - expected).abs().max() / expected.abs().max()
                        results.setdefault(name, {})["max_rel_err_vs_eager"] = err.item()
        for name in variants:
            if name not in calls:
                continue

            def fn(call=calls[name]):
                out = call()[0]
                if grad:
                    out.float().square().mean().backward()

            ctx = torch.enable_grad() if grad else torch.no_grad()
            with ctx:
                ms, mem = bench(fn, device, reps)
            results.setdefault(name, {})[mode] = {"ms": ms, "peak_mib": mem}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--tf32", action="store_true", help="allow tf32 in float32 matmuls (both paths)")
    parser.add_argument("--variants", default="eager,compiled,composite,fused")
    parser.add_argument("--train", action="store_true", help="training mode (BatchNorm batch statistics)")
    parser.add_argument("--levels", default="layer,decoder", help="what to time: layer, decoder or both")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, a few reps (CPU check)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (CUDA uses do_bench)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    variants = [v for v in args.variants.split(",") if v]
    global BATCH
    shapes = [(t, h, w) for t in SEQ_LENS for h, w in IMAGES]
    if args.smoke:
        BATCH, shapes, args.reps = 2, [(3, 3, 5)], 1
        variants = [v for v in variants if v != "compiled"]  # compiling on a CPU box is slow and not the point

    peak = peak_tflops(device, dtype)
    rows = []
    for t, h, w in shapes:
        for level, case_cls in (("layer", LayerCase), ("decoder", DecoderCase)):
            if level not in args.levels.split(","):
                continue
            results = run_case(case_cls, t, h, w, device, dtype, variants, args.reps, args.train)
            flops = layer_flops(t, h * w)
            if level == "decoder":  # layer 0 has no ARM: QK^T and PV once
                flops = (LAYERS - 1) * flops + 2 * 2 * BATCH * NHEAD * t * h * w * (D_MODEL // NHEAD)
            for timings in results.values():
                for mode, entry in timings.items():
                    if not isinstance(entry, dict):
                        continue
                    f = flops * (3 if mode == "forward_backward" else 1)
                    entry["tflops"] = f / entry["ms"] / 1e9
                    entry["fraction_of_peak"] = entry["tflops"] / peak if peak else None
            rows.append({"level": level, "batch": BATCH, "T": t, "h": h, "w": w, "L": h * w, "results": results})
            print(json.dumps(rows[-1]), flush=True)

    import triton

    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "fastcomer": fastcomer.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "config": {"d_model": D_MODEL, "nhead": NHEAD, "dc": DC, "decoder_layers": LAYERS, "dtype": args.dtype,
                   "tf32": args.tf32, "train": args.train, "variants": variants},
        "measured_peak_tflops": peak,
        "flops_note": "useful FLOPs: QK^T twice, PV, 5x5 conv, 1x1 projection per ARM layer; backward = 2x forward",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
