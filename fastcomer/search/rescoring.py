"""What every bidirectional beam search of fastcomer shares with CoMER's: the rescoring of
first-pass hypotheses by the opposite direction, and the choice of the final answer
(docs/function.md, 'Rescoring')."""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.arm import FoldedARM, folded_copy
from ..ops.cross_attention_step.reference import refine_folded
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
    # CoMER raises an integer count to alpha, which yields the default float dtype; kept above 0
    # (as `length_penalty`) so that a large negative alpha never divides by zero.
    penalty = (tgt != PAD_IDX).sum(dim=1) ** alpha
    penalty = penalty.clamp(min=torch.finfo(penalty.dtype).tiny)
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


# The ARM's convolution runs on this many positions at a time, so that its input and output
# stay in the cache: on this project's 2-core AMD EPYC (1 thread, 8x32 maps, 2026-11-23) 32
# positions ran at 81-96 GFLOP/s, 256 at 47-54.
CONV_ROWS = 32


def refinement(arm: FoldedARM, prev_attn: Tensor, curr_attn: Tensor, valid: Tensor, key_padding_mask: Tensor,
               height: int) -> Tensor:
    """The ARM's R for teacher-forced rows, folded (eval BatchNorm in the projection).

    prev_attn, curr_attn [nhead, n, t, L] (what the previous layer returned, this layer's
    unrefined attention), valid [n, t] (bool: the positions whose outputs count),
    key_padding_mask [L] -> R [n, t, nhead, L]. The coverage of position s, the sum of
    the attentions before it, is a running sum over s, as the first pass accumulates it;
    the convolution runs on the valid positions only (those past a row's end feed only
    later ones, which never count), R is 0 at the others.
    """
    nhead, n, t, L = curr_attn.shape
    parts = ([prev_attn] if arm.coverage.uses_cross else []) + ([curr_attn] if arm.coverage.uses_self else [])
    attentions = torch.cat(parts)  # [C, n, t, L]
    coverage = torch.empty_like(attentions)
    coverage[:, :, 0] = 0.0
    for s in range(1, t):
        torch.add(coverage[:, :, s - 1], attentions[:, :, s - 1], out=coverage[:, :, s])
    index = valid.view(-1).nonzero().view(-1)
    rows = coverage.permute(1, 2, 0, 3).reshape(n * t, -1, L)  # a view: [n*t, C, L]
    r = coverage.new_zeros(n * t, nhead, L)
    for start in range(0, len(index), CONV_ROWS):
        chunk = index[start : start + CONV_ROWS]
        # under autocast the refinement may come out in another dtype than the attentions
        r[chunk] = refine_folded(arm, rows[chunk], key_padding_mask.expand(len(chunk), L), height).to(r.dtype)
    return r.view(n, t, nhead, L)


def cross_attention(attn, x: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor,
                    refine: Optional[Callable[[Tensor], Tensor]]) -> Tuple[Tensor, Tensor]:
    """`MultiheadAttention.forward` over one image's memory K/V, every row's queries in one
    matmul per head: x [n, t, d], k, v [nhead, L, head_dim], key_padding_mask [L]; refine
    maps this layer's attention [nhead, n, t, L] to R [n, t, nhead, L]. Returns the
    projected output [n, t, d] and the attention used, [nhead, n, t, L]."""
    n, t, d = x.shape
    nhead, L, head_dim = k.shape
    q = attn.project_query(x).view(n * t, nhead, head_dim).transpose(0, 1).contiguous()
    scores = torch.bmm(q, k.transpose(1, 2))  # [nhead, n * t, L]
    masked = key_padding_mask.expand_as(scores)
    weights = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)
    if refine is not None:
        r = refine(weights.view(nhead, n, t, L)).view(n * t, nhead, L).transpose(0, 1)
        weights = torch.softmax((scores - r).masked_fill(masked, float("-inf")), dim=-1)
    out = torch.bmm(weights, v).transpose(0, 1).reshape(n, t, d)
    return attn.out_proj(out), weights.view(nhead, n, t, L)


def teacher_forced_logits(decoder, memory_kv: Sequence[Tuple[Tensor, Tensor]], key_padding_mask: Tensor, height: int,
                          tgt: Tensor) -> Tensor:
    """`Decoder.forward` of rows tgt [n, t] that read one image: its memory K/V per layer
    ([nhead, L, head_dim] each) and key_padding_mask [L] -> logits [n, t, vocab]. Outputs
    at PAD positions of tgt are not the reference's (the scores ignore them)."""
    arm = folded_copy(decoder.model.arm)
    t = tgt.shape[1]
    pad = tgt == PAD_IDX
    causal = torch.ones(t, t, dtype=torch.bool, device=tgt.device).triu_(1)
    x = decoder.embed(tgt)
    returned = None  # the attention the previous layer returned
    for layer, (k, v) in zip(decoder.model.layers, memory_kv):
        x = layer.norm1(x + layer.self_attn(x, x, pad, causal)[0])
        refine = None
        if arm is not None and returned is not None:
            prev = returned
            refine = lambda curr: refinement(arm, prev, curr, ~pad, key_padding_mask, height)  # noqa: E731
        out, returned = cross_attention(layer.multihead_attn, x, k, v, key_padding_mask, refine)
        x = layer.feed_forward(layer.norm2(x + out))
    return decoder.proj(x)


def memory_key_values(decoder, memory: Tensor) -> List[Tuple[Tensor, Tensor]]:
    """One image's memory [L, d] -> per decoder layer its cross-attention K, V [nhead, L, head_dim]."""
    nhead = decoder.nhead
    return [tuple(x.view(-1, nhead, x.shape[-1] // nhead).transpose(0, 1).contiguous()
                  for x in layer.multihead_attn.project_key_value(memory))
            for layer in decoder.model.layers]


def rescore(decoder, feature: Tensor, feature_mask: Tensor, first_pass_hyps, beam_size: int, alpha: float, temperature: float) -> Tensor:
    """Score every first-pass hypothesis by the opposite direction, teacher-forced: row i
    of the result belongs to first_pass_hyps[i]. Per image, its memory K/V is projected
    once, and its hypotheses of similar lengths run in one forward each: padding a short
    one to a long one's length would cost time, not change its score."""
    batch, height, width, d = feature.shape
    half = batch * beam_size
    seqs = first_pass_in_l2r_order(first_pass_hyps, batch, beam_size)
    scores = []
    order = []
    for image in range(batch):
        memory_kv = memory_key_values(decoder, feature[image].reshape(height * width, d))
        key_padding_mask = feature_mask[image].reshape(-1)
        of_image = [i for i in range(len(seqs)) if (i // beam_size) % batch == image]
        for batch_rows in length_batches([len(seqs[i]) for i in of_image]):
            rows = [of_image[j] for j in batch_rows]
            tgt, out = teacher_forcing_batch([seqs[i] for i in rows], [i >= half for i in rows], feature.device)
            logits = teacher_forced_logits(decoder, memory_kv, key_padding_mask, height, tgt)
            scores.append(sequence_scores(logits, tgt, out, alpha, temperature))
            order += rows
    result = torch.cat(scores)
    return result[torch.tensor(order, device=result.device).argsort()]
