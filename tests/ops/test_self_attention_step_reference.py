"""The self-attention step's torch reference (what the Triton kernel is tested against), step
by step over a prefix, against the decoder layer run on the whole prefix at once."""
import torch

from fastcomer.model.decoder import TransformerDecoderLayer
from fastcomer.ops.self_attention_step import self_attention_step
from fastcomer.vocab import PAD_IDX


def test_reference_steps_equal_the_layer_on_the_whole_prefix():
    torch.manual_seed(0)
    d_model, nhead, rows, max_len, window = 24, 4, 3, 8, 6
    layer = TransformerDecoderLayer(d_model, nhead, 2 * d_model, dropout=0.0).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(rows, window, d_model, dtype=torch.float64)
    tokens = torch.randint(3, 50, (rows, max_len))
    tokens[1, 2] = PAD_IDX  # a PAD inside the prefix: the step and the layer both mask it
    tokens[:, window:] = PAD_IDX
    causal = torch.ones(window, window, dtype=torch.bool).triu_(1)
    head_dim = d_model // nhead
    keys = torch.zeros(rows, nhead, head_dim, max_len, dtype=torch.float64)
    values = torch.zeros(rows, nhead, max_len, head_dim, dtype=torch.float64)
    revealed = torch.full_like(tokens, PAD_IDX)  # as in decoding: PAD after the newest token
    with torch.no_grad():
        whole = layer.norm1(x + layer.self_attn(x, x, tokens[:, :window] == PAD_IDX, causal)[0])
        for t in range(window):
            revealed[:, t] = tokens[:, t]
            stepped, query = self_attention_step(x[:, t], layer, keys, values, revealed, torch.tensor(t), window,
                                                 backend="torch")
            torch.testing.assert_close(stepped, whole[:, t], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(query, layer.multihead_attn.project_query(whole[:, t]), rtol=1e-12, atol=1e-12)
