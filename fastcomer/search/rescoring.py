"""What every bidirectional beam search of fastcomer shares with CoMER's (SPEC section 3):
the rescoring of first-pass hypotheses by the opposite direction, and the choice of the
final answer."""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..vocab import EOS_IDX, PAD_IDX, SOS_IDX
from .hypotheses import Hypothesis


def teacher_forcing_batch(seqs: Sequence[Sequence[int]], l2r: Sequence[bool], device) -> tuple:
    """Token lists in left-to-right order -> (tgt, out) [n, max_len + 1] for teacher forcing,
    row i decoded left to right when l2r[i] (SOS ... -> ... EOS), else right to left."""
    length = max(len(s) for s in seqs) + 1
    tgt = torch.full((len(seqs), length), PAD_IDX, dtype=torch.long)
    out = torch.full((len(seqs), length), PAD_IDX, dtype=torch.long)
    for i, (seq, forward) in enumerate(zip(seqs, l2r)):
        tokens = list(seq) if forward else list(seq)[::-1]
        start, stop = (SOS_IDX, EOS_IDX) if forward else (EOS_IDX, SOS_IDX)
        tgt[i, : len(tokens) + 1] = torch.tensor([start] + tokens)
        out[i, : len(tokens) + 1] = torch.tensor(tokens + [stop])
    return tgt.to(device), out.to(device)


def sequence_scores(logits: Tensor, tgt: Tensor, out: Tensor, alpha: float, temperature: float) -> Tensor:
    """-(sum of token cross-entropies) / (non-PAD tokens of tgt) ** alpha, per row."""
    loss = F.cross_entropy((logits / temperature).flatten(0, 1), out.flatten(), ignore_index=PAD_IDX, reduction="none")
    # CoMER raises an integer count to alpha, which yields the default float dtype.
    penalty = (tgt != PAD_IDX).sum(dim=1) ** alpha
    return -loss.view(out.shape).sum(dim=1) / penalty


def first_pass_in_l2r_order(
    first_pass_hyps: Sequence[Sequence[int]], batch: int, beam_size: int, l2r: Sequence[bool] = (True, False)
) -> List[List[int]]:
    """First-pass hypotheses in left-to-right reading order (right-to-left ones reversed);
    l2r gives the direction of each block of batch*beam_size hypotheses."""
    block = batch * beam_size
    return [list(h) if l2r[i // block] else list(h)[::-1] for i, h in enumerate(first_pass_hyps)]


def select_best(
    first_pass_hyps: Sequence[Sequence[int]], scores: Tensor, batch: int, beam_size: int,
    l2r: Sequence[bool] = (True, False),
) -> List[Hypothesis]:
    """Per image the best of its hypotheses over the directions `l2r` (in that order,
    first maximum wins), read left to right."""
    seqs = first_pass_in_l2r_order(first_pass_hyps, batch, beam_size, l2r)
    per_item = scores.view(len(l2r), batch, beam_size)
    per_image = torch.cat(tuple(per_item), dim=1)
    best_scores, best = per_image.max(dim=1)
    answers = []
    for image, (k, score) in enumerate(zip(best.tolist(), best_scores.tolist())):
        direction, rank = divmod(k, beam_size)
        answers.append(Hypothesis(seqs[(direction * batch + image) * beam_size + rank], score))
    return answers


def length_batches(lengths: Sequence[int]) -> List[List[int]]:
    """Indices grouped longest first into batches in which no sequence is padded to more
    than twice its length (+1)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: List[List[int]] = []
    for i in order:
        if batches and 2 * (lengths[i] + 1) >= lengths[batches[-1][0]] + 1:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def rescore(decoder, feature: Tensor, feature_mask: Tensor, first_pass_hyps, beam_size: int, alpha: float, temperature: float) -> Tensor:
    """Score every first-pass hypothesis by the opposite direction, teacher-forced: row i
    of the result belongs to first_pass_hyps[i]. Hypotheses of similar lengths run in one
    forward each: padding a short one to a long one's length would cost time, not change
    its score."""
    batch = feature.shape[0]
    half = batch * beam_size
    seqs = first_pass_in_l2r_order(first_pass_hyps, batch, beam_size)
    scores = []
    order = []
    for rows in length_batches([len(s) for s in seqs]):
        tgt, out = teacher_forcing_batch([seqs[i] for i in rows], [i >= half for i in rows], feature.device)
        image = torch.tensor([(i // beam_size) % batch for i in rows], device=feature.device)
        logits = decoder(feature[image], feature_mask[image], tgt)
        scores.append(sequence_scores(logits, tgt, out, alpha, temperature))
        order += rows
    result = torch.cat(scores)
    return result[torch.tensor(order, device=result.device).argsort()]
