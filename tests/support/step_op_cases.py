"""Random inputs of one call of each decoding step's custom op (`<op>/custom_op.py`) and of
its entry, for tests/ops/test_decoding_custom_ops.py (torch backend) and the interpreter's
tests/interpreter/test_decoding_custom_ops.py (triton backend)."""
import copy
from typing import Any, Callable, NamedTuple, Tuple

import torch

from fastcomer.model.decoder import TransformerDecoderLayer
from fastcomer.ops.beam_scorer_step import FinishedLists, beam_scorer_step
from fastcomer.ops.beam_scorer_step.custom_op import beam_scorer_step_op
from fastcomer.ops.feed_forward_step import feed_forward_step
from fastcomer.ops.feed_forward_step.custom_op import FeedForwardWeights, feed_forward_step_op
from fastcomer.ops.self_attention_step import self_attention_step
from fastcomer.ops.self_attention_step.custom_op import SelfAttentionWeights, self_attention_step_op
from fastcomer.vocab import PAD_IDX

D, NHEAD, ROWS, MAX_LEN = 16, 2, 6, 7
ITEMS, BEAM, VOCAB = 2, 3, 11


def random_layer() -> TransformerDecoderLayer:
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(D, NHEAD, 2 * D, dropout=0.0).eval().requires_grad_(False)
    for p in layer.parameters():
        p.add_(torch.randn_like(p) * 0.3)  # biases and norms away from their initial 0 and 1
    layer.norm1.eps, layer.norm3.eps = 1e-3, 1e-4  # each norm's own eps reaches the op
    return layer


class Case(NamedTuple):
    entry: Callable
    op: Any  # torch.ops.fastcomer.<name>
    wrapper: Callable  # <name>_op, what the engine calls
    entry_args: tuple
    op_args: tuple
    updated: Tuple[Tuple[int, ...], Tuple[int, ...]]  # the arguments each call updates (entry's, op's)
    backend: str


def self_attention_case(backend: str = "torch") -> Case:
    layer = random_layer()
    g = torch.Generator().manual_seed(1)
    head_dim = D // NHEAD
    x = torch.randn(ROWS, D, generator=g)
    keys = torch.randn(ROWS, NHEAD, head_dim, MAX_LEN, generator=g)
    values = torch.randn(ROWS, NHEAD, MAX_LEN, head_dim, generator=g)
    tokens = torch.randint(3, 50, (ROWS, MAX_LEN), generator=g)
    tokens[1, 1] = tokens[:, 4:] = PAD_IDX  # a PAD inside the window, and after the newest token
    position, window = torch.tensor(3), 5
    entry_args = (x, layer, keys, values, tokens, position, window)
    op_args = (x, keys, values, tokens, position, window, *SelfAttentionWeights.from_layer(layer), backend)
    return Case(self_attention_step, torch.ops.fastcomer.self_attention_step, self_attention_step_op, entry_args,
                op_args, ((2, 3), (1, 2)), backend)


def feed_forward_case(backend: str = "torch") -> Case:
    layer = random_layer()
    g = torch.Generator().manual_seed(2)
    x, attended = torch.randn(ROWS, D, generator=g), torch.randn(ROWS, D, generator=g)
    entry_args = (x, attended, layer)
    op_args = (x, attended, *FeedForwardWeights.from_layer(layer), backend)
    return Case(feed_forward_step, torch.ops.fastcomer.feed_forward_step, feed_forward_step_op, entry_args, op_args,
                ((), ()), backend)


def beam_scorer_case(backend: str = "torch") -> Case:
    g = torch.Generator().manual_seed(3)
    end_token = torch.tensor([2, 5])
    logits = torch.randn(ITEMS * BEAM, VOCAB, generator=g)
    logits[:, 2] += 2.0  # item 0's end token ranks high: its list gets entries
    beam_scores = -torch.rand(ITEMS, BEAM, generator=g)
    done = torch.tensor([False, True])  # a done item adds nothing
    finished = FinishedLists(ITEMS, BEAM, MAX_LEN, alpha=1.0, early_stopping=False, device="cpu")
    tokens = torch.randint(3, 50, (ITEMS * BEAM, MAX_LEN), generator=g)
    position, temperature = torch.tensor(3), 0.7
    entry_args = (logits, temperature, beam_scores, done, end_token, finished, tokens, position)
    op_args = (logits, temperature, beam_scores, done, end_token, *finished.state(), finished.early_stopping, tokens,
               position, backend)
    # the lists' tensors are the op's arguments 5 to 11
    return Case(beam_scorer_step, torch.ops.fastcomer.beam_scorer_step, beam_scorer_step_op, entry_args, op_args,
                ((2, 3, 5), (2, 3, *range(5, 12))), backend)


CASES = {"self_attention_step": self_attention_case, "feed_forward_step": feed_forward_case,
         "beam_scorer_step": beam_scorer_case}


def updated_tensors(args, positions):
    """The updated arguments' tensors (a FinishedLists': its state's)."""
    found = []
    for arg in (args[i] for i in positions):
        found.extend(arg.state() if isinstance(arg, FinishedLists) else [arg])
    return found


def assert_same_call(case: Case, run, args, updated):
    """The entry on the case's backend and `run`, each on copies of its arguments: equal results
    and equal updated inputs (which the call changed)."""
    want_args, got_args = copy.deepcopy(case.entry_args), copy.deepcopy(args)
    want, got = case.entry(*want_args, backend=case.backend), run(*got_args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    want_updated = updated_tensors(want_args, case.updated[0])
    torch.testing.assert_close(updated_tensors(got_args, updated), want_updated, rtol=0, atol=0)
    before = updated_tensors(case.entry_args, case.updated[0])
    assert not want_updated or not all(torch.equal(a, b) for a, b in zip(want_updated, before))
