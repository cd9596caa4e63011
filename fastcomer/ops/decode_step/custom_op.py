"""The decode step's kernels as a torch.library custom op (`torch.ops.fastcomer.decode_step`),
so that torch.compile traces a kernel step as one node with a fake implementation, and
never meets the CUDA extension's pybind11 call (raw pointers), which would break the graph.
The extension stays free of torch's C++ ABI: the op is registered here, in Python, around
the dispatcher `fused_cross_attention_step`.

`decode_step` is what the decoding engine calls: the plain-PyTorch backend runs the
dispatcher directly, so that compilers and exporters (torch.export, ONNX) see its
operations; traced, the kernel backends go through the op; eager calls skip it.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ...model.arm import CoverageMode, FoldedARM
from ..tracing import is_tracing
from . import fused_cross_attention_step
from .interface import returned_dtype


@torch.library.custom_op("fastcomer::decode_step", mutates_args=("coverage",))
def _decode_step_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, image_index: Tensor, height: int,
    conv_weight: Optional[Tensor], conv_bias: Optional[Tensor], proj_weight: Optional[Tensor], shift: Optional[Tensor],
    coverage_mode: str, coverage: Optional[Tensor], prev_attn: Optional[Tensor], backend: str,
    rows_per_image: Optional[int], index_checked: bool,
) -> Tuple[Tensor, Tensor]:
    arm = None if conv_weight is None else FoldedARM(conv_weight, conv_bias, proj_weight, shift,
                                                      CoverageMode(coverage_mode))
    return fused_cross_attention_step(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn,
                                      backend=backend, rows_per_image=rows_per_image, index_checked=index_checked)


@_decode_step_op.register_fake
def _(q, k, v, key_padding_mask, image_index, height, *rest):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[1], k.shape[2]), dtype=returned_dtype(q))


def decode_step(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, image_index: Tensor, height: int,
                arm: Optional[FoldedARM], coverage: Optional[Tensor], prev_attn: Optional[Tensor], backend: str,
                rows_per_image: Optional[int] = None, index_checked: bool = False) -> Tuple[Tensor, Tensor]:
    """`fused_cross_attention_step` (same arguments and results) for a resolved backend
    ('torch', 'triton' or 'cuda'): traced, the kernels as the custom op and 'torch' inline;
    eager, the dispatcher itself (no op dispatch overhead)."""
    if backend == "torch" or not is_tracing(q):
        return fused_cross_attention_step(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn,
                                          backend=backend, rows_per_image=rows_per_image, index_checked=index_checked)
    weights = (None,) * 4 + (CoverageMode.CROSS.value,) if arm is None else (*arm[:4], arm.coverage.value)
    return torch.ops.fastcomer.decode_step(q, k, v, key_padding_mask, image_index, height, *weights, coverage,
                                           prev_attn, backend, rows_per_image, index_checked)
