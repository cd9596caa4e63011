"""The fused beam scorer (Triton, through the interpreter) against the torch scorer it
replaces, over several steps of tiny random searches: lists filling up, evictions, done
flags, early stopping."""
import os

import pytest
import torch

from fastcomer.ops.beam_scorer_step import beam_scorer_step
from fastcomer.ops.beam_scorer_step.finished_lists import FIELDS, FinishedLists

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (tests/run.sh does it)", allow_module_level=True)

ITEMS, BEAM, VOCAB, MAX_LEN, STEPS = 3, 4, 12, 8, 6


def random_logits(gen: torch.Generator, end_token: torch.Tensor, exact: bool) -> torch.Tensor:
    """[rows, vocab] logits whose end tokens often rank high. exact: one logit 0 per row and
    the others <= -110, so that log_softmax is the logits themselves, bitwise, in any
    implementation (exp underflows to 0, log(1) = 0)."""
    rows = ITEMS * BEAM
    ends = end_token.repeat_interleave(BEAM)
    if exact:
        logits = -110.0 - torch.rand(rows, VOCAB, generator=gen) * 50
        top = torch.where(torch.rand(rows, generator=gen) < 0.5, ends, torch.randint(0, VOCAB, (rows,), generator=gen))
        logits[torch.arange(rows), top] = 0.0
        return logits
    logits = torch.randn(rows, VOCAB, generator=gen) * 2
    logits[torch.arange(rows), ends] += torch.rand(rows, generator=gen) * 4
    return logits


def search_steps(backend: str, seed: int, exact: bool, early_stopping: bool, temperature: float):
    """STEPS scorer steps from a fresh start, as a generator: each step's outputs and state."""
    gen = torch.Generator().manual_seed(seed)
    end_token = torch.tensor([0, 1, 0])
    beam_scores = torch.full((ITEMS, BEAM), float("-inf"))
    beam_scores[:, 0] = 0.0
    done = torch.tensor([False, False, True])  # a filler item: done from the start
    finished = FinishedLists(ITEMS, BEAM, MAX_LEN, 0.8, early_stopping, "cpu")
    tokens = torch.randint(2, VOCAB, (ITEMS * BEAM, MAX_LEN), generator=gen)
    position = torch.zeros((), dtype=torch.long)
    for _ in range(STEPS):
        logits = random_logits(gen, end_token, exact)
        parents, next_tokens = beam_scorer_step(logits, temperature, beam_scores, done, end_token, finished, tokens,
                                                position, backend=backend)
        yield (parents.clone(), next_tokens.clone(), beam_scores.clone(), done.clone(),
               {name: getattr(finished, name)[:, :BEAM].clone() if name != "count" else finished.count.clone()
                for name in FIELDS}, finished.clock.clone())
        tokens = tokens[parents]
        position += 1
        tokens[:, position] = next_tokens


def run_searches(backend: str, seed: int, exact: bool, early_stopping: bool, temperature: float):
    """STEPS scorer steps from a fresh start; returns every step's outputs and the final state."""
    return list(search_steps(backend, seed, exact, early_stopping, temperature))


def assert_same_steps(fused, plain, exact: bool):
    for step, (f, p) in enumerate(zip(fused, plain)):
        where = f"step {step}"
        for name, a, b in (("parents", f[0], p[0]), ("next tokens", f[1], p[1]), ("done", f[3], p[3]),
                           ("clock", f[5], p[5])):
            assert torch.equal(a, b), f"{where}: {name} {a} != {b}"
        if exact:
            assert torch.equal(f[2], p[2]), f"{where}: beam scores"
        else:
            torch.testing.assert_close(f[2], p[2], rtol=1e-6, atol=0)
        count = p[4]["count"]
        assert torch.equal(f[4]["count"], count), f"{where}: list counts"
        filled = torch.arange(BEAM)[None] < count[:, None]
        for name in ("stamp", "length", "tokens", "score"):
            a, b = f[4][name][filled], p[4][name][filled]
            if name == "score" and not exact:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
            else:
                assert torch.equal(a, b), f"{where}: list {name} {a} != {b}"
    # the runs exercise full lists (evictions) and done flags
    assert (plain[-1][4]["count"][:2] == BEAM).any() and plain[-1][3][:2].any()


@pytest.mark.parametrize("seed, early_stopping, temperature", [(0, False, 1.0), (1, True, 1.0), (2, False, 0.7)])
def test_scorer_kernel_is_bitwise_the_torch_scorer(seed, early_stopping, temperature):
    """With an exactly representable log-softmax everything is bitwise equal, the float64
    list scores (sum / length**alpha from the table) included."""
    exact = temperature == 1.0
    fused = run_searches("triton", seed, exact, early_stopping, temperature)
    plain = run_searches("torch", seed, exact, early_stopping, temperature)
    assert_same_steps(fused, plain, exact)


def test_scorer_kernel_on_random_logits():
    """Any logits: the same choices, scores within float32 rounding of the log-softmax."""
    fused = run_searches("triton", 3, False, False, 1.0)
    plain = run_searches("torch", 3, False, False, 1.0)
    assert_same_steps(fused, plain, False)


def test_overlapping_launches_keep_their_own_clocks(monkeypatch):
    """Two searches' scorer launches overlap on a device (concurrent searches, a graph's warm-up
    on its side stream): here each step of search B runs between the second and third
    programs of search A's step. Each search's insertion stamps (its list's order and eviction tie-break)
    and clock are still those of the torch scorer."""
    from triton.runtime import interpreter

    set_grid_idx = interpreter.InterpreterBuilder.set_grid_idx
    search_b = search_steps("triton", 1, True, False, 1.0)
    fused_b, pending = [], [True]

    def interleaving_set_grid_idx(self, x, y, z):
        if x == 2 and pending:  # A's programs 0 and 1 have run: B's whole launch runs now
            pending.clear()
            fused_b.append(next(search_b))
        set_grid_idx(self, x, y, z)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "set_grid_idx", interleaving_set_grid_idx)
    fused_a = []
    for step in search_steps("triton", 0, True, False, 1.0):
        fused_a.append(step)
        pending.append(True)
    monkeypatch.undo()
    assert len(fused_b) == STEPS  # one of B's steps inside each of A's launches
    assert_same_steps(fused_a, run_searches("torch", 0, True, False, 1.0), True)
    assert_same_steps(fused_b, run_searches("torch", 1, True, False, 1.0), True)
