"""The beam step that CUDA graphs replay, checked on CPU: it has no host sync and no
data-dependent shape (it runs on the meta device, where any read of a value raises); the
search driven as with graphs (power-of-two image slots with fillers, done flags read every
few steps, batches kept across searches) answers as the reference; and a batch that takes
over some images of another continues their searches exactly; a reorder with fixed addresses
(graphs) computes what one that swaps buffers does."""
import gc
import weakref

import pytest
import torch

from fastcomer import CoMER, reference_beam_search
from fastcomer.search.engine import beam_search
from fastcomer.search.kept_slots import kept_slots
from fastcomer.search.options import SearchOptions
from fastcomer.search.search_slots import FeatureLayout, SearchSlots
from fastcomer.ops.beam_scorer_step.finished_lists import FinishedLists
from fastcomer.search.decoding_state import DecodingState, prefix_window
from fastcomer.vocab import SOS_IDX
from fastcomer.ops.dispatch import DispatchPlan

from support.random_models import random_images, random_model
from support.search_cases import assert_same_search


@pytest.mark.parametrize("coverage", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["cross+self", "cross", "self", "no-arm"])
def test_beam_step_reads_no_value_on_the_host(coverage):
    cross, self_ = coverage
    model = CoMER(d_model=32, growth_rate=4, num_layers=1, nhead=4, num_decoder_layers=3, dim_feedforward=64, dc=8,
                  cross_coverage=cross, self_coverage=self_).eval().to("meta")
    meta = torch.device("meta")
    batch = SearchSlots(model.decoder, 4, SearchOptions(beam_size=3, max_len=40),
                        FeatureLayout(3, 5, torch.float32, meta, DispatchPlan.of("torch", torch.float32, False)))
    with torch.inference_mode():
        batch.start(torch.empty(2, 3, 5, 32, device=meta), torch.empty(2, 3, 5, dtype=torch.bool, device=meta))
        for window in (32, 40):
            batch.step(window)
        batch.finish()
    assert batch.state.tokens.device == meta


def test_graph_policy_matches_reference(graph_policy):
    """Three images' six searches fill eight slots, and move to fewer as they end; the
    second search of the same shapes reuses the first one's batches (and would replay
    their graphs)."""
    model = random_model(5)
    settings = dict(beam_size=3, max_len=30, alpha=0.8, temperature=1.2)
    for seed in (11, 12):
        img, mask = random_images(seed, [(32, 64), (48, 48), (32, 80)])
        out = beam_search(model, img, mask, **settings, return_details=True)
        ref = reference_beam_search(model, img, mask, **settings, return_details=True)
        assert_same_search(out, ref)
        kept = kept_slots(model.decoder)
        sizes = sorted(batch.items for batch in kept.values())
        if seed == 11:
            first = dict(kept)
    assert sizes[-1] == 8 and len(sizes) >= 2  # searches that ended early moved to smaller batches
    assert all(kept[key] is batch for key, batch in first.items())  # the second search reused them


def test_kept_batches_follow_weight_changes(graph_policy):
    """A batch kept from an earlier search folds the ARM again when the next search starts:
    after an in-place change of the weights that search answers as the reference (see
    tests/test_reliability.py for changes the version counters miss)."""
    model = random_model(7)
    img, mask = random_images(3, [(32, 64)])
    settings = dict(beam_size=4, max_len=12)
    beam_search(model, img, mask, **settings)
    with torch.no_grad():
        model.decoder.model.arm.conv.weight.mul_(-2.0)
    out = beam_search(model, img, mask, **settings, return_details=True)
    assert_same_search(out, reference_beam_search(model, img, mask, **settings, return_details=True))


def test_take_continues_the_searches():
    """Searches moved after a few steps to a smaller batch, in another slot order, end with
    the finished lists they reach when they stay."""
    model = random_model(4)
    with torch.inference_mode():
        check_take(model)


def check_take(model):
    img, mask = random_images(2, [(32, 64), (48, 48), (32, 80)])
    feature, feature_mask = model.encoder(img, mask)
    beam_size, max_len = 3, 20
    args = (SearchOptions(beam_size=beam_size, max_len=max_len),
            FeatureLayout(*feature.shape[1:3], feature.dtype, feature.device, DispatchPlan.of("torch", feature.dtype, False)))
    stay, moved = SearchSlots(model.decoder, 8, *args), SearchSlots(model.decoder, 3, *args)
    stay.start(feature, feature_mask)
    for length in range(1, max_len):
        stay.step(prefix_window(length, max_len, graphs=False))
        if length == 12:  # both hold 13 tokens per row now
            moved.take(stay, [5, 0])  # image 2 right to left, image 0 left to right, and a filler
            assert moved.finished.count.sum() > 0  # lists that must move too
        elif length > 12:
            moved.step(prefix_window(length, max_len, graphs=False))
    expected, actual = (FinishedLists(6, beam_size, max_len, 1.0, False, "cpu") for _ in range(2))
    for batch, lists in ((stay, expected), (moved, actual)):
        batch.finish()
        batch.store(lists)
    assert moved.item_ids.tolist() == [5, 0, -1]
    others = torch.tensor([1, 2, 3, 4])  # not moved: copied over, so that whole lists compare
    actual.copy_items(expected, others, others)
    assert actual.results()[0] == expected.results()[0]
    assert torch.equal(actual.results()[1], expected.results()[1])


def test_kept_batches_do_not_keep_the_model(graph_policy):
    model = random_model(8)
    img, mask = random_images(3, [(32, 48)])
    beam_search(model, img, mask, beam_size=2, max_len=6)
    assert len(kept_slots(model.decoder)) >= 1
    decoder = weakref.ref(model.decoder)
    del model
    gc.collect()
    assert decoder() is None


def test_reorder_swaps_buffers_unless_addresses_are_fixed():
    """A reorder swaps gathered buffers in (CPU) or, for CUDA graphs, copies them back into
    the state's tensors: the same steps either way, also with windows past the prefix (which
    read positions a reorder did not gather), and fixed addresses never move."""
    model = random_model(4)
    img, mask = random_images(6, [(32, 48), (48, 32)])
    with torch.inference_mode():
        feature, feature_mask = model.encoder(img, mask)
        states = [DecodingState(model.decoder, 2, 3, *feature.shape[1:3], 8, feature.dtype, feature.device,
                                DispatchPlan.of("torch", feature.dtype, False),
                                fixed_addresses=fixed) for fixed in (False, True)]
        for state in states:
            state.start(feature, feature_mask, torch.full((6,), SOS_IDX))
        swapping, fixed = states
        addresses = [{name: getattr(state, name).data_ptr() for name in DecodingState.REORDERED} for state in states]
        generator = torch.Generator().manual_seed(0)
        for length in range(1, 8):
            window = length if length % 2 else 8  # the prefix, or all of max_len
            logits = [state.step(window) for state in states]
            assert torch.equal(logits[0], logits[1])
            parents = torch.randint(0, 6, (6,), generator=generator)
            tokens = torch.randint(3, logits[0].shape[1], (6,), generator=generator)
            for state in states:
                state.reorder(parents, length)
                state.append(tokens)
        assert torch.equal(swapping.tokens, fixed.tokens)
        assert torch.equal(swapping.coverage, fixed.coverage)
        for name in DecodingState.REORDERED:
            assert getattr(fixed, name).data_ptr() == addresses[1][name]
        # 7 reorders, an odd number of swaps: each swapping state tensor is in its other buffer
        assert all(getattr(swapping, name).data_ptr() != addresses[0][name] for name in DecodingState.REORDERED)
