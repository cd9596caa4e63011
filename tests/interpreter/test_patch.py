"""fastcomer.patch / unpatch and the fused modules, run through Triton's interpreter
(backend forced to 'triton' on CPU tensors)."""
import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/run.sh sets it too)

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastcomer
from fastcomer.model.arm import AttentionRefinementModule
from fastcomer.model.attention import MultiheadAttention as PlainAttention
from fastcomer.modules import CoMERFusedARMAttention, FusedARMAttention, FusedDecoder
from fastcomer.vocab import PAD_IDX

from support.asserts import assert_close_rel, assert_gradients_close
from support.tolerances import GRADIENT_FLOOR, RTOL_FLOAT32_CHAIN as RTOL32, RTOL_FLOAT32_GOLDEN as RTOL_GOLDEN


def training_step(model, golden):
    feature = torch.cat((golden["feature"], golden["feature"])).float()
    mask = torch.cat((golden["feature_mask"], golden["feature_mask"]))
    logits = model.decoder(feature, mask, golden["tgt"])
    loss = F.cross_entropy(logits.flatten(0, 1), golden["out"].flatten(), ignore_index=PAD_IDX)
    loss.backward()
    grads = {name: p.grad for name, p in model.decoder.named_parameters()}
    return logits.detach(), loss.detach(), grads


def check_grads(grads, expected, rtol, what, plain32=None):
    """support.asserts.assert_gradients_close, floored at GRADIENT_FLOOR of the largest gradient."""
    assert_gradients_close(grads, expected, rtol, GRADIENT_FLOOR, what, plain32)


def test_patched_training_step_matches_plain_and_golden(golden, golden_model):
    plain = golden_model.float().train()
    patched = fastcomer.patch(copy.deepcopy(plain), backend="triton")
    assert all(isinstance(layer.multihead_attn, FusedARMAttention) for layer in patched.decoder.model.layers)

    logits, loss, grads = training_step(patched, golden)
    ref_logits, ref_loss, ref_grads = training_step(plain, golden)
    assert_close_rel(logits, ref_logits, RTOL32, "logits vs plain float32")
    assert_close_rel(loss, ref_loss, RTOL32, "loss vs plain float32")
    check_grads(grads, ref_grads, 10 * RTOL32, "vs plain float32")
    assert_close_rel(logits, golden["logits_train"], RTOL_GOLDEN, "logits vs golden")
    assert_close_rel(loss, golden["loss_train"], RTOL_GOLDEN, "loss vs golden")
    check_grads(grads, golden["grads_train"], 10 * RTOL_GOLDEN, "vs golden", ref_grads)

    # the ARM's BatchNorm ran twice per step (layers 1 and 2) and tracked its statistics
    bn, ref_bn = patched.decoder.model.arm.post_norm.bn, plain.decoder.model.arm.post_norm.bn
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 2
    assert_close_rel(bn.running_mean, ref_bn.running_mean, RTOL32, "running_mean")
    assert_close_rel(bn.running_var, ref_bn.running_var, RTOL32, "running_var")


def test_patched_eval_matches_golden(golden, golden_model):
    model = fastcomer.patch(golden_model.float().eval(), backend="triton")
    feature = torch.cat((golden["feature"], golden["feature"])).float()
    mask = torch.cat((golden["feature_mask"], golden["feature_mask"]))
    with torch.no_grad():
        logits, attns = model.decoder(feature, mask, golden["tgt"], return_attention=True)
    assert_close_rel(logits, golden["logits_eval"], RTOL_GOLDEN, "logits_eval")
    for j, (attn, expected) in enumerate(zip(attns, golden["cross_attn_eval"])):
        assert_close_rel(attn, expected, RTOL_GOLDEN, f"cross_attn_eval layer {j}")


def test_patch_keeps_state_and_unpatch_restores(golden_model):
    model = golden_model.float()
    plain_attns = [layer.multihead_attn for layer in model.decoder.model.layers]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    assert fastcomer.patch(model) is model
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p is params[name] for name, p in model.named_parameters())
    model.train()
    assert all(layer.multihead_attn.training for layer in model.decoder.model.layers)
    model.load_state_dict(state)  # a CoMER state dict loads into the patched model
    assert fastcomer.unpatch(model) is model
    assert [layer.multihead_attn for layer in model.decoder.model.layers] == plain_attns
    assert all(a.training for a in plain_attns)
    assert list(model.state_dict()) == list(state)
    with pytest.raises(ValueError, match="backend"):
        fastcomer.patch(model, backend="fast")
    with pytest.raises(ValueError, match="no CoMER"):
        fastcomer.patch(nn.Linear(2, 2))


def test_backend_switch(golden, golden_model, monkeypatch):
    """'torch' (argument or FASTCOMER_BACKEND) runs the plain path: bit-identical to the unpatched model."""
    model = golden_model.float().eval()
    feature, mask = golden["feature"][:1].float(), golden["feature_mask"][:1]
    tgt = golden["tgt"][:1]
    with torch.no_grad():
        ref = model.decoder(feature, mask, tgt)
        fastcomer.patch(model, backend="torch")
        assert torch.equal(model.decoder(feature, mask, tgt), ref)
        fastcomer.patch(model)  # backend None: the environment decides at each call
        monkeypatch.setenv("FASTCOMER_BACKEND", "torch")
        assert torch.equal(model.decoder(feature, mask, tgt), ref)
        monkeypatch.setenv("FASTCOMER_BACKEND", "triton")
        fused = model.decoder(feature, mask, tgt)
        assert not torch.equal(fused, ref)
        assert_close_rel(fused, ref, RTOL32, "triton vs torch")


def test_fused_decoder_module(golden):
    torch.manual_seed(0)
    kwargs = dict(d_model=32, nhead=2, num_decoder_layers=2, dim_feedforward=64, dropout=0.0, dc=4,
                  cross_coverage=True, self_coverage=True)
    decoder = FusedDecoder(**kwargs, backend="triton")
    plain = fastcomer.unpatch(copy.deepcopy(decoder))
    assert isinstance(plain.model.layers[0].multihead_attn, PlainAttention)
    assert list(decoder.state_dict()) == list(plain.state_dict())
    feature = torch.randn(2, 3, 5, 32)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[1, 2:, 3:] = True
    tgt = torch.tensor([[1, 5, 6, 7], [1, 8, 9, PAD_IDX]])
    with torch.no_grad():
        assert_close_rel(decoder(feature, mask, tgt), plain(feature, mask, tgt), RTOL32, "FusedDecoder")


# --- a stand-in of the public CoMER code's classes: seq-first, its call signatures ---


class MultiheadAttention(nn.Module):
    """Mimics CoMER's copy of nn.MultiheadAttention: seq-first, (query, key, value, arm, ...)."""

    def __init__(self, embed_dim, num_heads, dropout=0.0):
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self._qkv_same_embed_dim, self.bias_k, self.bias_v, self.add_zero_attn = True, None, None, False
        self.in_proj_weight = nn.Parameter(torch.randn(3 * embed_dim, embed_dim) / embed_dim**0.5)
        self.in_proj_bias = nn.Parameter(0.1 * torch.randn(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query, key, value, arm=None, key_padding_mask=None, need_weights=True, attn_mask=None):
        d, n = self.embed_dim, self.num_heads
        t, b, _ = query.shape
        q = F.linear(query, self.in_proj_weight[:d], self.in_proj_bias[:d]) * (d // n) ** -0.5
        k = F.linear(key, self.in_proj_weight[d : 2 * d], self.in_proj_bias[d : 2 * d])
        v = F.linear(value, self.in_proj_weight[2 * d :], self.in_proj_bias[2 * d :])
        q, k, v = (x.reshape(x.shape[0], b * n, d // n).transpose(0, 1) for x in (q, k, v))
        dots = torch.bmm(q, k.transpose(1, 2))

        def mask_softmax(x):
            x = x.view(b, n, t, -1).masked_fill(key_padding_mask[:, None, None], float("-inf")).view(b * n, t, -1)
            return F.dropout(F.softmax(x, -1), self.dropout, self.training)

        attention = mask_softmax(dots)
        if arm is not None:
            attention = mask_softmax(dots - arm(attention))
        out = torch.bmm(attention, v).transpose(0, 1).reshape(t, b, d)
        return self.out_proj(out), (attention if need_weights else None)


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model, nhead):
        super().__init__()
        self.multihead_attn = MultiheadAttention(d_model, nhead)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, arm, memory_key_padding_mask=None):
        tgt2, attn = self.multihead_attn(tgt, memory, memory, arm=arm, key_padding_mask=memory_key_padding_mask)
        return self.norm2(tgt + tgt2), attn


class TransformerDecoder(nn.Module):
    def __init__(self, d_model, nhead, num_layers, dc):
        super().__init__()
        self.layers = nn.ModuleList(TransformerDecoderLayer(d_model, nhead) for _ in range(num_layers))
        self.arm = AttentionRefinementModule(nhead, dc, True, True)

    def forward(self, tgt, memory, height, memory_key_padding_mask):
        arm = None
        for layer in self.layers:
            tgt, attn = layer(tgt, memory, arm, memory_key_padding_mask=memory_key_padding_mask)
            arm = functools.partial(self.arm, attn, memory_key_padding_mask, height)
        return tgt


def test_patch_public_comer_structure():
    torch.manual_seed(0)
    model = TransformerDecoder(d_model=16, nhead=2, num_layers=3, dc=4).train()
    plain, plain64 = copy.deepcopy(model), copy.deepcopy(model).double()
    fastcomer.patch(model, backend="triton")
    assert all(isinstance(layer.multihead_attn, CoMERFusedARMAttention) for layer in model.layers)
    assert list(model.state_dict()) == list(plain.state_dict())
    h, w, b, t = 3, 5, 2, 4
    mask = torch.zeros(b, h * w, dtype=torch.bool)
    mask[1, -4:] = True
    tgt, memory = torch.randn(t, b, 16), torch.randn(h * w, b, 16)
    out, ref = model(tgt, memory, h, mask), plain(tgt, memory, h, mask)
    ref64 = plain64(tgt.double(), memory.double(), h, mask)
    assert_close_rel(out, ref64, RTOL32, "output")
    upstream = torch.randn(t, b, 16)  # not a function of ||out||: the LayerNorm fixes that
    for y in (out, ref, ref64):
        (y * upstream.to(y.dtype)).sum().backward()
    grads = lambda m: {k: p.grad for k, p in m.named_parameters()}
    check_grads(grads(model), grads(plain64), RTOL32, "CoMER stand-in", grads(plain))
    assert_close_rel(model.arm.post_norm.bn.running_var, plain.arm.post_norm.bn.running_var, RTOL32, "running_var")
    fastcomer.unpatch(model)
    assert all(type(layer.multihead_attn) is MultiheadAttention for layer in model.layers)
