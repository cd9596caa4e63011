"""Tiny models and inputs for the torch.compile / torch.export / ONNX tests: tracing time
grows with the model's modules, so these keep every test at a few seconds on 2 CPU cores."""
import torch

from fastcomer import CoMER
from fastcomer.vocab import PAD_IDX, SOS_IDX

TINY = dict(d_model=16, growth_rate=4, num_layers=1, nhead=2, num_decoder_layers=3, dim_feedforward=32, dc=4,
            dropout=0.0)


def tiny_model(seed: int = 0, dtype=torch.float32, **overrides) -> CoMER:
    torch.manual_seed(seed)
    model = CoMER(**{**TINY, **overrides}).to(dtype).eval()
    with torch.no_grad():  # BatchNorm statistics away from identity, so that they matter
        bn = model.decoder.model.arm.post_norm.bn
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return model


def tiny_batch(seed: int = 0, dtype=torch.float32, t: int = 5):
    """img [2, 1, 32, 48], img_mask (image 1 padded on the right), tgt [4, t] (l2r and r2l rows, one padded)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(2, 1, 32, 48, generator=g, dtype=dtype)
    img_mask = torch.zeros(2, 32, 48, dtype=torch.bool)
    img_mask[1, :, 30:] = True
    img[img_mask[:, None]] = 0.0
    tgt = torch.randint(3, 100, (4, t), generator=g)
    tgt[:, 0] = SOS_IDX
    tgt[3, t - 2 :] = PAD_IDX
    return img, img_mask, tgt


def graph_breaks(fn, *args) -> int:
    """torch._dynamo.explain's graph-break count for fn(*args), with its reasons on failure."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, [r.reason.splitlines()[0] for r in explanation.break_reasons]
    return explanation.graph_count
