"""The one marker for tests that need a CUDA GPU (skipped on CPU machines, such as CI's)."""
import pytest
import torch

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
