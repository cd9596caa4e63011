"""A structural stand-in of the public CoMER code's `CoMER` and `LitCoMER`: the same class names,
attribute names and parameter names (its attention seq-first with one in_proj_weight), no
`config`, and the public signatures of `beam_search` / `approximate_joint_search`. Its own
(unpatched) beam search is the reference: `fastcomer.reference_beam_search` over a copy of its
weights, as CoMER's code computes it. `public_comer_module()` gives the real public code when it
is importable, for the tests that compare against it."""
import torch
import torch.nn as nn

from fastcomer import load_comer, reference_beam_search
from fastcomer.model.arm import AttentionRefinementModule
from fastcomer.model.encoder import Encoder
from fastcomer.vocab import VOCAB_SIZE

from support.random_models import random_model


class MultiheadAttention(nn.Module):
    """CoMER's copy of nn.MultiheadAttention: its attributes and parameters (decoding never calls it)."""

    def __init__(self, embed_dim, num_heads, dropout=0.0):
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self._qkv_same_embed_dim, self.bias_k, self.bias_v, self.add_zero_attn = True, None, None, False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)


class TransformerDecoder(nn.Module):
    def __init__(self, layers, arm):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(layers)
        self.norm = None
        self.arm = arm


class WordPosEnc(nn.Module):
    def __init__(self, d_model, max_len=500):
        super().__init__()
        self.register_buffer("pe", torch.zeros(max_len, d_model))


class Decoder(nn.Module):
    def __init__(self, d_model, nhead, num_decoder_layers, dim_feedforward, dropout, dc, cross_coverage, self_coverage):
        super().__init__()
        self.word_embed = nn.Sequential(nn.Embedding(VOCAB_SIZE, d_model), nn.LayerNorm(d_model))
        self.pos_enc = WordPosEnc(d_model)
        self.norm = nn.LayerNorm(d_model)
        arm = AttentionRefinementModule(nhead, dc, cross_coverage, self_coverage) if cross_coverage or self_coverage else None
        layers = [TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_decoder_layers)]
        self.model = TransformerDecoder(layers, arm)
        self.proj = nn.Linear(d_model, VOCAB_SIZE)


class CoMER(nn.Module):
    def __init__(self, d_model, growth_rate, num_layers, nhead, num_decoder_layers, dim_feedforward, dropout, dc,
                 cross_coverage, self_coverage):
        super().__init__()
        self.encoder = Encoder(d_model=d_model, growth_rate=growth_rate, num_layers=num_layers)
        self.decoder = Decoder(d_model, nhead, num_decoder_layers, dim_feedforward, dropout, dc, cross_coverage, self_coverage)

    def beam_search(self, img, img_mask, beam_size, max_len, alpha, early_stopping, temperature, **kwargs):
        arm = self.decoder.model.arm
        hints = {} if arm is None else {"cross_coverage": arm.cross_coverage, "self_coverage": arm.self_coverage}
        copy = load_comer({k: v.detach().clone() for k, v in self.state_dict().items()}, config=hints)
        return reference_beam_search(copy, img, img_mask, beam_size, max_len, alpha, early_stopping, temperature)


class LitCoMER(nn.Module):
    def __init__(self, beam_size=3, max_len=12, alpha=1.0, early_stopping=False, temperature=1.0, learning_rate=0.08,
                 patience=20, **model_kwargs):
        super().__init__()
        self.hparams = dict(model_kwargs, beam_size=beam_size, max_len=max_len, alpha=alpha, early_stopping=early_stopping,
                            temperature=temperature, learning_rate=learning_rate, patience=patience)
        self.comer_model = CoMER(**model_kwargs)

    def approximate_joint_search(self, img, mask):
        return self.comer_model.beam_search(img, mask, **self.hparams)


def lit_comer_holding(lit_class, model: nn.Module, **search) -> nn.Module:
    """`lit_class` (the stand-in LitCoMER, or the public code's) with fastcomer `model`'s
    hyper-parameters and weights, in its dtype, in eval mode; search: its search settings
    (alpha, early_stopping, temperature CoMER's where not given), the training ones published."""
    config = {k: v for k, v in model.config.__dict__.items() if k != "vocab_size"}  # fixed in the public code
    settings = {"alpha": 1.0, "early_stopping": False, "temperature": 1.0, **search}
    lit = lit_class(**settings, **config, learning_rate=0.08, patience=20).to(next(model.parameters()).dtype)
    lit.comer_model.load_state_dict(model.state_dict())
    return lit.eval()


def standin_lit_comer(seed: int, dtype=torch.float32, **search) -> LitCoMER:
    """A LitCoMER stand-in in eval mode holding random_model(seed)'s weights."""
    return lit_comer_holding(LitCoMER, random_model(seed, dtype), **search)


def public_comer_module():
    """The public code's `comer` package when it is importable, else None."""
    try:
        import comer.lit_comer
    except ImportError:  # not installed, or its dependencies (pytorch_lightning, einops) are not
        return None
    return comer.lit_comer
