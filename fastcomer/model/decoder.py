"""CoMER's decoder: word embedding + 1-D sine position encoding, post-norm Transformer
decoder layers whose cross-attention is refined by one shared ARM, output projection."""
import copy
from functools import partial
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..vocab import PAD_IDX, VOCAB_SIZE
from .arm import AttentionRefinementModule
from .attention import MultiheadAttention


class WordPositionEncoding(nn.Module):
    def __init__(self, d_model: int, max_len: int = 500, temperature: float = 10000.0):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)
        inv_freq = 1.0 / (temperature ** (torch.arange(0, d_model, 2, dtype=torch.float32) / d_model))
        angle = position[:, None] * inv_freq
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = angle.sin()
        pe[:, 1::2] = angle.cos()
        self.register_buffer("pe", pe)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """x [b, t, d] holds positions offset .. offset+t-1."""
        t = x.shape[1]
        if offset + t > self.pe.shape[0]:
            raise ValueError(f"sequence of {offset + t} tokens exceeds the position table ({self.pe.shape[0]})")
        return x + self.pe[offset : offset + t]


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def feed_forward(self, x: Tensor) -> Tensor:
        """The block after cross-attention: x = norm3(x + FFN(x))."""
        return self.norm3(x + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x))))))

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        arm,
        tgt_mask: Optional[Tensor],
        tgt_key_padding_mask: Optional[Tensor],
        memory_key_padding_mask: Tensor,
    ) -> Tuple[Tensor, Tensor]:
        x = self.norm1(tgt + self.dropout1(self.self_attn(tgt, tgt, tgt_key_padding_mask, tgt_mask)[0]))
        out, attn = self.multihead_attn(x, memory, memory_key_padding_mask, arm=arm)
        x = self.norm2(x + self.dropout2(out))
        return self.feed_forward(x), attn


class TransformerDecoder(nn.Module):
    """The layer stack; layer j > 0 refines its cross-attention with the shared ARM,
    fed the attention that layer j-1 returned."""

    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, arm: Optional[AttentionRefinementModule]):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.arm = arm

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        height: int,
        tgt_mask: Tensor,
        tgt_key_padding_mask: Tensor,
        memory_key_padding_mask: Tensor,
    ) -> Tuple[Tensor, List[Tensor]]:
        x, arm, attns = tgt, None, []
        for layer in self.layers:
            x, attn = layer(x, memory, arm, tgt_mask, tgt_key_padding_mask, memory_key_padding_mask)
            attns.append(attn)
            if self.arm is not None:
                arm = partial(self.arm, attn, memory_key_padding_mask, height)
        return x, attns


class Decoder(nn.Module):
    def __init__(
        self,
        d_model: int,
        nhead: int,
        num_decoder_layers: int,
        dim_feedforward: int,
        dropout: float,
        dc: int,
        cross_coverage: bool,
        self_coverage: bool,
        vocab_size: int = VOCAB_SIZE,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.word_embed = nn.Sequential(nn.Embedding(vocab_size, d_model), nn.LayerNorm(d_model))
        self.pos_enc = WordPositionEncoding(d_model)
        self.norm = nn.LayerNorm(d_model)
        arm = AttentionRefinementModule(nhead, dc, cross_coverage, self_coverage) if (cross_coverage or self_coverage) else None
        layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout)
        self.model = TransformerDecoder(layer, num_decoder_layers, arm)
        self.proj = nn.Linear(d_model, vocab_size)

    def embed(self, tokens: Tensor, offset: int = 0) -> Tensor:
        """tokens [b, t] at positions offset.. -> decoder input [b, t, d]."""
        return self.norm(self.pos_enc(self.word_embed(tokens), offset))

    def forward(
        self, feature: Tensor, feature_mask: Tensor, tgt: Tensor, return_attention: bool = False
    ) -> Union[Tensor, Tuple[Tensor, List[Tensor]]]:
        """feature [b, h, w, d], feature_mask [b, h, w] (True = padding), tgt [b, t] ->
        logits [b, t, vocab]; with return_attention also every layer's returned
        cross-attention, [(b nhead), t, h*w] each."""
        b, h, w, d = feature.shape
        if feature_mask.shape != (b, h, w):
            raise ValueError(f"feature_mask must be [b, h, w] = {(b, h, w)}, got {tuple(feature_mask.shape)}")
        if tgt.dim() != 2 or tgt.shape[0] != b:
            raise ValueError(f"tgt must be [b, t] with b = {b}, got {tuple(tgt.shape)}")
        t = tgt.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=tgt.device).triu_(1)
        x, attns = self.model(
            self.embed(tgt),
            feature.reshape(b, h * w, d),
            height=h,
            tgt_mask=causal,
            tgt_key_padding_mask=tgt == PAD_IDX,
            memory_key_padding_mask=feature_mask.reshape(b, h * w),
        )
        logits = self.proj(x)
        return (logits, attns) if return_attention else logits
