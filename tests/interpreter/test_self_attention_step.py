"""The fused self-attention block (Triton, through the interpreter) against its torch
reference, step after step on the same caches, at float32 tolerance."""
import os

import pytest
import torch

from fastcomer.model.decoder import TransformerDecoderLayer
from fastcomer.ops.self_attention_step import self_attention_step
from fastcomer.vocab import PAD_IDX

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (tests/run.sh does it)", allow_module_level=True)


@pytest.mark.parametrize("d_model, nhead, max_len, window", [(48, 4, 8, 8), (24, 2, 12, 5)])  # d 48: two chunks of the GEMVs
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed-weights"])
def test_fused_self_attention_matches_the_reference(d_model, nhead, max_len, window, transposed):
    """transposed: the out projection's weight is the transpose of a contiguous tensor (same
    values, other strides), which the kernel must not read as row-major."""
    torch.manual_seed(d_model)
    layer = TransformerDecoderLayer(d_model, nhead, 2 * d_model, dropout=0.0).eval()
    with torch.no_grad():
        for p in layer.parameters():  # biases and norms away from their init, so all are exercised
            p.add_(torch.randn_like(p) * 0.3)
        if transposed:
            out_proj = layer.self_attn.out_proj
            out_proj.weight = torch.nn.Parameter(out_proj.weight.t().contiguous().t())
    rows = 3
    tokens = torch.full((rows, max_len), PAD_IDX)
    head_dim = d_model // nhead
    caches = {name: (torch.zeros(rows, nhead, head_dim, max_len), torch.zeros(rows, nhead, max_len, head_dim))
              for name in ("torch", "triton")}
    with torch.no_grad():
        for step in range(window):
            position = torch.tensor(step)
            tokens[:, step] = torch.randint(3, 50, (rows,))
            if step == 2:
                tokens[0, 1] = PAD_IDX  # a PAD inside the prefix is masked too
            x = torch.randn(rows, d_model)
            outs = {name: self_attention_step(x, layer, *cache, tokens, position, window, backend=name)
                    for name, cache in caches.items()}
            for fused, plain in zip(outs["triton"], outs["torch"]):
                torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
            for fused, plain in zip(caches["triton"], caches["torch"]):
                torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
