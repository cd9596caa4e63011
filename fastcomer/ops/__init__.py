"""Fused ops, one package each: `arm_attention` (training: the ARM cross-attention, Triton)
and `decode_step` (decoding: one step of it, CUDA, Triton or PyTorch). Importing them does
not import triton; the Triton kernels are imported when first launched (set
TRITON_INTERPRET=1 before that to run them on the CPU)."""
from .arm_attention import ARMWeights, arm_attention
from .decode_step import fused_cross_attention_step

__all__ = ["ARMWeights", "arm_attention", "fused_cross_attention_step"]
