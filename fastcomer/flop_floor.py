"""The compute floor of a beam search on this machine: the FLOPs the engine's search of one
image does (encoder, first pass and rescoring, counted by torch's FlopCounterMode), over the
rates this machine reaches on the ops that carry them (measured here, in this process, at
the search's shapes and intra-op threads). `fastcomer bench` reports the engine's time as a
ratio to it.

FlopCounterMode counts the matrix ops (convolutions, matmuls); the element-wise rest
(softmax, norms, the ARM's sums) is memory traffic, small beside them, and left out: the
floor is a lower bound.
"""
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .model.adapt import as_comer
from .model.arm import CONV_PADDING, KERNEL_SIZE
from .search.engine import beam_search
from .search.rescoring import CONV_ROWS
from .search.threads import intra_op_threads, search_threads

CONVOLUTIONS = ("convolution", "_convolution", "conv2d")


def count_flops(model, img: torch.Tensor, mask: torch.Tensor, **search_kwargs) -> Dict[str, int]:
    """FLOPs of `beam_search(model, img, mask, **search_kwargs)` by aten op name."""
    return flops_of(lambda: beam_search(model, img, mask, **search_kwargs))


def flops_of(fn: Callable[[], object]) -> Dict[str, int]:
    """FLOPs of fn() by aten op name."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op).split(".")[-1]: int(n) for op, n in counter.get_flop_counts()["Global"].items()}


def seconds_at(by_op: Dict[str, int], rates: Dict[str, float]) -> float:
    """Seconds of the FLOPs by_op at the rates: convolutions at the conv rate, the rest at the matmul rate."""
    conv = sum(n for op, n in by_op.items() if op in CONVOLUTIONS)
    return conv / rates["conv"] + (sum(by_op.values()) - conv) / rates["matmul"]


def best_rate(fn: Callable[[], object], flops: float, repeats: int = 5) -> float:
    """FLOP/s of fn at its fastest of `repeats` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flops / best


def measure_rates(model, height: int, width: int) -> Dict[str, float]:
    """This machine's FLOP/s on the two kinds of ops that carry a search's FLOPs, at its
    shapes: the ARM's KERNEL_SIZE x KERNEL_SIZE convolution over CONV_ROWS coverage images of
    the feature map's size (as rescoring runs it; a model without ARM: nhead -> nhead
    channels; the faster of its contiguous and channels-last layouts), and a matmul of
    CONV_ROWS rows by the decoder's feed-forward weight."""
    decoder = model.decoder
    dtype = next(model.parameters()).dtype
    arm = decoder.model.arm
    h, w = height // 16, width // 16  # the encoder's feature map (DenseNet, stride 16)
    if arm is not None:
        weight, bias = arm.conv.weight.detach(), arm.conv.bias.detach()
    else:
        weight = torch.rand(decoder.nhead, decoder.nhead, KERNEL_SIZE, KERNEL_SIZE, dtype=dtype)
        bias = torch.rand(decoder.nhead, dtype=dtype)
    x = torch.rand(CONV_ROWS, weight.shape[1], max(h, 1), max(w, 1), dtype=dtype)
    conv_flops = 2 * CONV_ROWS * weight.numel() * x.shape[2] * x.shape[3]
    a = torch.rand(CONV_ROWS, decoder.d_model, dtype=dtype)
    ffn = decoder.model.layers[0].linear1.weight.detach()
    # the faster of the layouts oneDNN runs it in (the engine picks one by instruction set, `conv_memory_format`)
    weights = [weight.contiguous(memory_format=layout) for layout in (torch.contiguous_format, torch.channels_last)]
    return {
        "conv": max(best_rate(lambda: F.conv2d(x, laid_out, bias, padding=CONV_PADDING), conv_flops)
                    for laid_out in weights),
        "matmul": best_rate(lambda: F.linear(a, ffn), 2 * CONV_ROWS * ffn.numel()),
    }


def flop_floor(model, img: torch.Tensor, mask: torch.Tensor, threads=None, **search_kwargs) -> Dict:
    """The floor of the engine's search of img [b, 1, H, W] per image on this machine:
    {"flops_per_image", "flops_by_op" (per image), "rates_gflop_s" {"conv", "matmul"},
    "floor_s_per_image", "encoder_flops_per_image", "encoder_floor_s_per_image" (the
    encoder's share: its own FLOPs at the same rates), "threads"}; FLOPs of convolutions
    count at the conv rate, all others at the matmul rate. CPU models only."""
    if img.device.type != "cpu":
        raise ValueError(f"flop_floor measures CPU rates: img must be on the CPU, got {img.device}")
    threads = search_threads(threads)
    images = img.shape[0]
    with torch.inference_mode(), intra_op_threads(threads):
        by_op = count_flops(model, img, mask, threads=threads, **search_kwargs)
        encoder_by_op = flops_of(lambda: as_comer(model).encoder(img, mask))
        rates = measure_rates(model, img.shape[-2], img.shape[-1])
    floor_s = seconds_at(by_op, rates)
    return {
        "flops_per_image": sum(by_op.values()) / images,
        "flops_by_op": {op: n / images for op, n in sorted(by_op.items())},
        "rates_gflop_s": {kind: rate / 1e9 for kind, rate in rates.items()},
        "floor_s_per_image": floor_s / images,
        "encoder_flops_per_image": sum(encoder_by_op.values()) / images,
        "encoder_floor_s_per_image": seconds_at(encoder_by_op, rates) / images,
        "threads": threads,
    }
