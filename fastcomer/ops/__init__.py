"""Fused ops. The Triton ones are exported where Triton is installed (importing them
imports triton: set TRITON_INTERPRET=1 before this import to run them on the CPU)."""
import importlib.util

if importlib.util.find_spec("triton") is not None:
    from .arm_attention import ARMWeights, arm_attention  # noqa: F401
