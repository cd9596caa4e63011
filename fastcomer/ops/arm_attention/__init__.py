"""Fused cross-attention with CoMER's Attention Refinement Module, for training (the ARM's math:
docs/function.md, 'The Attention Refinement Module').

`arm_attention(q, k, v, key_padding_mask, height, width, prev_attn, arm, ...)` returns
the attention output before out_proj [B*H, T, D] and the attention the layer returns,
[B*H, T, L] (the refined one A' after dropout, or the plain one without ARM), which is
the next layer's `prev_attn`. It is the entry and the one place that branches on the
backend: the Triton kernels (`triton_kernel`: the coverage, a running sum over target steps,
is built inside the conv kernel from the per-step attentions themselves, so `prev_attn` is
the previous layer's returned attention, as CoMER passes it) or plain PyTorch (`reference`,
the function the kernels are tested against). Importing this package does not import triton.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..dispatch import BackendRequest, resolve
from .inputs import PRECISIONS, ARMWeights, check_inputs, float32_precisions

__all__ = ["ARMWeights", "PRECISIONS", "arm_attention"]


def arm_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor,
    height: int,
    width: int,
    prev_attn: Optional[Tensor] = None,
    arm: Optional[ARMWeights] = None,
    *,
    bn_training: bool = False,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    precision: Optional[str] = None,
    backend: BackendRequest = None,
) -> Tuple[Tensor, Tensor]:
    """Cross-attention of CoMER's decoder layer, with the ARM refinement when `arm` is given.

    q [B*H, T, D] (already scaled by D^-0.5), k, v [B*H, L, D], key_padding_mask [B, L]
    bool (True = padding), L = height*width row-major; prev_attn [B*H, T, L]: the
    attention the previous layer returned (needed for 'cross' and 'both' coverage).
    bn_training: BatchNorm on batch statistics (and running statistics updated in place).
    dropout_p > 0 applies attention dropout (pass it only in training); seed picks the
    random stream (drawn from torch's generator when None); forward and backward agree.
    precision: 'ieee' (exact float32 products) or 'tf32' (float32 inputs only) for every
    matmul of the Triton kernels; None follows eager PyTorch's float32 policy on CUDA: the
    attention matmuls in TF32 when torch.backends.cuda.matmul.allow_tf32 (as torch.bmm), the
    ARM conv and projection in TF32 when torch.backends.cudnn.allow_tf32 (as cuDNN's conv; on by
    default); 'ieee' on the CPU. Half inputs run the ARM conv and projection on half operands
    with float32 accumulation. The torch backend computes as eager PyTorch does: a precision
    other than its policy's raises there.
    backend: 'auto' | 'triton' | 'torch', or a mapping naming this op (default:
    $FASTCOMER_BACKEND, else auto: Triton for CUDA float32/16/bf16 tensors, torch otherwise).
    Returns out [B*H, T, D] (before out_proj) and the returned attention [B*H, T, L].
    """
    attention_precision, conv_precision = float32_precisions(q, precision)
    check_inputs(q, k, v, key_padding_mask, height, width, prev_attn, arm, attention_precision)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    # The dropout seed is a host integer baked into the launches: a CUDA graph would replay one
    # mask at every step. is_available first: on a CPU-only build the capture query raises.
    if dropout_p > 0 and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("arm_attention: dropout cannot be captured in a CUDA graph (its seed is fixed at "
                           "capture, every replay would drop the same positions); capture with dropout_p=0 "
                           "(eval) or run the training step eagerly")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (), device="cpu").item()) if dropout_p > 0 else 0
    name = resolve("arm_attention", q, backend)
    if name == "torch":
        if precision is not None and (attention_precision, conv_precision) != float32_precisions(q, None):
            raise ValueError(f"precision={precision!r}: the torch backend computes with eager PyTorch's float32 "
                             "policy (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32); "
                             "pass precision=None or set those flags")
        from .reference import arm_attention as torch_attention

        return torch_attention(q, k, v, key_padding_mask, height, prev_attn, arm, bn_training, dropout_p, seed)
    from .triton_kernel import arm_attention as triton_attention  # imports triton

    return triton_attention(q, k, v, key_padding_mask, height, width, prev_attn, arm, bn_training, dropout_p,
                            seed, attention_precision, conv_precision)
