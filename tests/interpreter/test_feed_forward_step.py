"""The fused layer tail (Triton, through the interpreter) against its torch reference, at
float32 tolerance."""
import os

import pytest
import torch

from fastcomer.model.decoder import TransformerDecoderLayer
from fastcomer.ops.feed_forward_step import feed_forward_step

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (tests/run.sh does it)", allow_module_level=True)


@pytest.mark.parametrize("d_model, nhead, hidden", [(48, 4, 96), (24, 2, 40)])  # d 48: two chunks of the GEMVs
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed-weights"])
def test_fused_layer_tail_matches_the_reference(d_model, nhead, hidden, transposed):
    """transposed: linear1's and linear2's weights are transposes of contiguous tensors (same
    values, other strides), which the kernel must not read as row-major."""
    torch.manual_seed(d_model)
    layer = TransformerDecoderLayer(d_model, nhead, hidden, dropout=0.0).eval()
    with torch.no_grad():
        for p in layer.parameters():  # biases and norms away from their init, so all are exercised
            p.add_(torch.randn_like(p) * 0.3)
        if transposed:
            for linear in (layer.linear1, layer.linear2):
                linear.weight = torch.nn.Parameter(linear.weight.t().contiguous().t())
        x, attended = torch.randn(3, d_model), torch.randn(3, d_model)
        fused = feed_forward_step(x, attended, layer, backend="triton")
        plain = feed_forward_step(x, attended, layer, backend="torch")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
