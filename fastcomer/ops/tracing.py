"""Whether an op's call is being traced (torch.compile, torch.export, fake tensors) rather than
run eagerly: the custom ops (`*/custom_op.py`) are what traces see; eager calls skip them."""
import torch
from torch import Tensor


def is_tracing(tensor: Tensor) -> bool:
    """True under torch.compile, or when `tensor` is a fake tensor (torch.export, FakeTensorMode)."""
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode((tensor,)) is not None
