"""The beam scorer in plain PyTorch: CoMER's scoring of one beam step, vectorised over items.
It is the reference of the fused kernel (`triton_kernel`) and the path of the torch backend."""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .finished_lists import FinishedLists


def beam_scorer_step(logits: Tensor, temperature: float, beam_scores: Tensor, done: Tensor, end_token: Tensor,
                     finished: FinishedLists, tokens: Tensor, position: Tensor) -> Tuple[Tensor, Tensor]:
    """See `fastcomer.ops.beam_scorer_step.beam_scorer_step`."""
    items, beam = beam_scores.shape
    length = position + 1  # tokens per row so far
    scores = F.log_softmax(logits / temperature, dim=-1) + beam_scores.view(-1, 1)
    vocab_size = logits.shape[1]
    top_scores, top_ids = scores.view(items, -1).topk(2 * beam, dim=1)
    rows = torch.arange(items, device=logits.device)[:, None] * beam + top_ids // vocab_size
    next_tokens = top_ids % vocab_size
    ends = next_tokens == end_token[:, None]
    # Ended candidates ranked below beam_size are dropped, as CoMER does; done items add none.
    offered = ends[:, :beam] & ~done[:, None]
    finished.add(top_scores[:, :beam], offered, rows[:, :beam], tokens, length)
    # The next beams: the first beam_size candidates that do not end, in rank order.
    keep = torch.sort(ends.to(torch.uint8), dim=1, stable=True).indices[:, :beam]
    beam_scores.copy_(top_scores.gather(1, keep))
    done |= finished.is_done(beam_scores.max(dim=1).values, length)
    return rows.gather(1, keep).view(-1), next_tokens.gather(1, keep).view(-1)
