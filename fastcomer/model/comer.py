"""The whole CoMER model: image encoder and bidirectional decoder."""
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict

import torch
import torch.nn as nn
from torch import Tensor

from ..vocab import VOCAB_SIZE
from .decoder import Decoder
from .encoder import Encoder


@dataclass(frozen=True)
class CoMERConfig:
    """CoMER's hyper-parameters; the defaults are the published config."""

    d_model: int = 256
    growth_rate: int = 24
    num_layers: int = 16
    nhead: int = 8
    num_decoder_layers: int = 3
    dim_feedforward: int = 1024
    dropout: float = 0.3
    dc: int = 32
    cross_coverage: bool = True
    self_coverage: bool = True
    vocab_size: int = VOCAB_SIZE

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "CoMERConfig":
        """Keeps the keys that are CoMER model hyper-parameters (a Lightning
        checkpoint also stores the beam search and optimiser settings)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


class CoMER(nn.Module):
    def __init__(
        self,
        d_model: int = 256,
        growth_rate: int = 24,
        num_layers: int = 16,
        nhead: int = 8,
        num_decoder_layers: int = 3,
        dim_feedforward: int = 1024,
        dropout: float = 0.3,
        dc: int = 32,
        cross_coverage: bool = True,
        self_coverage: bool = True,
        vocab_size: int = VOCAB_SIZE,
    ):
        super().__init__()
        self.config = CoMERConfig(
            d_model, growth_rate, num_layers, nhead, num_decoder_layers, dim_feedforward,
            dropout, dc, cross_coverage, self_coverage, vocab_size,
        )
        self.encoder = Encoder(d_model=d_model, growth_rate=growth_rate, num_layers=num_layers)
        self.decoder = Decoder(
            d_model=d_model,
            nhead=nhead,
            num_decoder_layers=num_decoder_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            dc=dc,
            cross_coverage=cross_coverage,
            self_coverage=self_coverage,
            vocab_size=vocab_size,
        )

    @classmethod
    def from_config(cls, config: CoMERConfig) -> "CoMER":
        return cls(**asdict(config))

    def forward(self, img: Tensor, img_mask: Tensor, tgt: Tensor) -> Tensor:
        """img [b, 1, H, W], img_mask [b, H, W] (True = padding), tgt [2b, t]
        (rows: b left-to-right sequences, then their b right-to-left ones) -> logits [2b, t, vocab]."""
        feature, mask = self.encoder(img, img_mask)
        return self.decoder(torch.cat((feature, feature)), torch.cat((mask, mask)), tgt)
