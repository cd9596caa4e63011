"""The fast decoding engine's public searches: CoMER's beam search with the same answers as
`reference_beam_search` (first pass in `first_pass.py`, rescoring in `rescoring.py`), and
a greedy search, both over the incremental decoder of `decoding_state.py`."""
from typing import List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.adapt import as_comer
from ..ops.beam_scorer_step.finished_lists import length_penalty
from ..ops.dispatch import BackendRequest
from ..vocab import EOS_IDX, PAD_IDX, SOS_IDX
from .decoding_state import DecodingState, prefix_window
from .engine_options import EngineOptions
from .first_pass import first_pass
from .hypotheses import BeamSearchOutput, Hypothesis, no_images_output
from .options import check_search_args, search_directions
from .rescoring import rescore, select_best
from .threads import with_search_threads


@with_search_threads
@torch.inference_mode()
def beam_search(
    model: torch.nn.Module,
    img: Tensor,
    img_mask: Tensor,
    beam_size: int = 10,
    max_len: int = 200,
    alpha: float = 1.0,
    early_stopping: bool = False,
    temperature: float = 1.0,
    return_details: bool = False,
    direction: str = "both",
    backend: BackendRequest = None,
    graphs: Optional[bool] = None,
    threads: Optional[int] = None,
) -> Union[List[Hypothesis], BeamSearchOutput]:
    """CoMER's beam search (docs/function.md, 'Beam search'), the same answers as
    `reference_beam_search`.

    model: fastcomer's CoMER, the public CoMER code's CoMER or LitCoMER (searched over its own
    tensors, see `fastcomer.model.adapt`).
    img [b, 1, H, W], img_mask [b, H, W] (True = padding); the model must be in eval mode.
    direction "both" is CoMER's bidirectional search with rescoring by the opposite
    direction; "l2r" or "r2l" runs that direction's searches alone, without rescoring:
    each image's answer is its best first-pass hypothesis (first maximum wins) and
    BeamSearchOutput.rescore is None. backend picks each decoding op's implementation, resolved
    once per search (`fastcomer.ops.dispatch`): 'auto' (for CUDA float32/16/bf16 models the
    fused kernels, the cross-attention step on the CUDA extension when it is built, Triton
    otherwise; plain PyTorch on the CPU), 'triton' or 'torch' for every op, or a mapping
    op -> backend such as {'cross_attention_step': 'cuda'} (only that op has a CUDA
    implementation, so 'cuda' for every op raises); None reads FASTCOMER_BACKEND. The kernels
    compute the same function in float32 arithmetic, so answers equal the reference's up to
    float32 near-ties. graphs: replay the steps as CUDA
    graphs (same results, less launch overhead); None reads FASTCOMER_CUDA_GRAPHS, whose
    default `auto` means on for models on CUDA. threads: torch's intra-op threads during
    the search (restored afterwards); None reads FASTCOMER_THREADS, default 1, the fastest
    for the step's small ops (`fastcomer.search.threads`); spread images over cores with
    `decode_images(..., workers=...)` instead.

    Arguments are checked before any work (docs/contract.md): a batch of 0 images
    returns [] (with return_details, empty lists).
    """
    model = as_comer(model)  # fastcomer's CoMER, the public code's CoMER or LitCoMER
    engine = EngineOptions(next(model.parameters()).device, backend, graphs, threads)
    options = check_search_args(model, img, img_mask, beam_size, max_len, temperature, alpha, early_stopping, direction)
    if img.shape[0] == 0:
        return no_images_output(img, return_details, rescored=len(options.l2r) == 2)
    feature, mask = model.encoder(img, img_mask)
    hyps, scores = first_pass(model.decoder, feature, mask, options, engine.plan(model.decoder, feature))
    batch = feature.shape[0]
    if len(options.l2r) == 1:
        best = select_best(hyps, scores, batch, beam_size, options.l2r)
        return BeamSearchOutput(best, hyps, scores, None) if return_details else best
    reverse = rescore(model.decoder, feature, mask, hyps, beam_size, options.alpha, temperature)
    best = select_best(hyps, scores + reverse, batch, beam_size)
    return BeamSearchOutput(best, hyps, scores, reverse) if return_details else best


@with_search_threads
@torch.inference_mode()
def greedy_search(
    model: torch.nn.Module,
    img: Tensor,
    img_mask: Tensor,
    max_len: int = 200,
    alpha: float = 1.0,
    temperature: float = 1.0,
    direction: str = "l2r",
    backend: BackendRequest = None,
    threads: Optional[int] = None,
) -> List[Hypothesis]:
    """Per image the most likely token at every step, in one direction ("l2r" or "r2l"),
    until the end token or max_len tokens (start token included).

    Score: sum of the chosen tokens' log-probabilities (end token included) / len**alpha,
    len counting the start token but not the end token, as a beam hypothesis's.
    backend, threads: as beam_search's.
    """
    model = as_comer(model)  # fastcomer's CoMER, the public code's CoMER or LitCoMER
    engine = EngineOptions(next(model.parameters()).device, backend, threads=threads)
    alpha = check_search_args(model, img, img_mask, 1, max_len, temperature, alpha).alpha
    (forward,) = search_directions(direction, ("l2r", "r2l"))
    if img.shape[0] == 0:
        return []
    start, end = (SOS_IDX, EOS_IDX) if forward else (EOS_IDX, SOS_IDX)
    feature, mask = model.encoder(img, img_mask)
    batch, h, w, _ = feature.shape
    state = DecodingState(model.decoder, batch, 1, h, w, max_len, feature.dtype, feature.device,
                          engine.plan(model.decoder, feature, graphs=False))
    state.start(feature, mask, torch.full((batch,), start, device=feature.device))
    sums = feature.new_zeros(batch)
    ended = torch.zeros(batch, dtype=torch.bool, device=feature.device)
    lengths = torch.full((batch,), max_len, device=feature.device)
    length = 1  # tokens per row
    while length < max_len:
        logits = state.step(prefix_window(length, max_len, graphs=False))
        logprobs, tokens = F.log_softmax(logits / temperature, dim=-1).max(dim=1)
        sums += logprobs.masked_fill(ended, 0.0)
        ends_now = (tokens == end) & ~ended
        lengths.masked_fill_(ends_now, length)
        ended |= ends_now
        if bool(ended.all()):  # the step's one host sync
            break
        state.append(tokens.masked_fill(ended, PAD_IDX))
        length += 1
    answers = []
    for row, (total, length) in enumerate(zip(sums.tolist(), lengths.tolist())):
        seq = state.tokens[row, 1:length].tolist()
        answers.append(Hypothesis(seq if forward else seq[::-1], total / length_penalty(length, alpha)))
    return answers
