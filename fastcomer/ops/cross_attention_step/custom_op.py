"""The cross-attention step's kernels as a torch.library custom op
(`torch.ops.fastcomer.cross_attention_step`), so that torch.compile traces a kernel step as
one node with a fake implementation, and never meets the CUDA extension's pybind11 call (raw
pointers), which would break the graph. The extension stays free of torch's C++ ABI: the op
is registered here, in Python, around the entry `cross_attention_step`.

`cross_attention_step_op` is what the decoding engine calls: the plain-PyTorch backend runs
the entry directly, so that compilers and exporters (torch.export, ONNX) see its operations;
traced, the kernel backends go through the op; eager calls skip it.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ...model.arm import CoverageMode, FoldedARM
from ..registry import OPS
from ..tracing import is_tracing
from . import cross_attention_step
from .inputs import returned_dtype


@torch.library.custom_op(OPS["cross_attention_step"].custom_op, mutates_args=("coverage",))
def _cross_attention_step_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, image_index: Tensor, height: int,
    conv_weight: Optional[Tensor], conv_bias: Optional[Tensor], proj_weight: Optional[Tensor], shift: Optional[Tensor],
    coverage_mode: str, coverage: Optional[Tensor], prev_attn: Optional[Tensor], backend: str,
    rows_per_image: Optional[int], index_checked: bool,
) -> Tuple[Tensor, Tensor]:
    arm = None if conv_weight is None else FoldedARM(conv_weight, conv_bias, proj_weight, shift,
                                                      CoverageMode(coverage_mode))
    return cross_attention_step(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn,
                                backend=backend, rows_per_image=rows_per_image, index_checked=index_checked)


@_cross_attention_step_op.register_fake
def _(q, k, v, key_padding_mask, image_index, height, *rest):
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[1], k.shape[2]), dtype=returned_dtype(q))


def cross_attention_step_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, image_index: Tensor,
                            height: int, arm: Optional[FoldedARM], coverage: Optional[Tensor],
                            prev_attn: Optional[Tensor], backend: str, rows_per_image: Optional[int] = None,
                            index_checked: bool = False) -> Tuple[Tensor, Tensor]:
    """`cross_attention_step` (same arguments and results) for a resolved backend ('torch',
    'triton' or 'cuda'): traced, the kernels as the custom op and 'torch' inline; eager, the
    entry itself (no op dispatch overhead)."""
    if backend == "torch" or not is_tracing(q):
        return cross_attention_step(q, k, v, key_padding_mask, image_index, height, arm, coverage, prev_attn,
                                    backend=backend, rows_per_image=rows_per_image, index_checked=index_checked)
    weights = (None,) * 4 + (CoverageMode.CROSS.value,) if arm is None else (*arm[:4], arm.coverage.value)
    return torch.ops.fastcomer.cross_attention_step(q, k, v, key_padding_mask, image_index, height, *weights,
                                                    coverage, prev_attn, backend, rows_per_image, index_checked)
