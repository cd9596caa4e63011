"""Kernel launches per beam step with the fused paths forced (backend 'triton', kernels
through the interpreter), counted by `support.launch_count` (its docstring states the rule).

The step traced has the published structure: CoMER's defaults except the widths (3 decoder
layers, 8 heads, the ARM with both coverages, the full vocabulary), one image searched in both
directions with beam 10 (20 rows). The count depends on that structure only: no op of the step
is split or repeated by size, so the published widths (d_model 256, feed-forward 1024, a real
feature map) launch the same kernels; the widths here only keep the interpreter fast.
Before the fused scorer, self-attention and layer-tail kernels a step launched 162."""
from dataclasses import asdict, replace
import os

import pytest
import torch

from fastcomer import CoMER
from fastcomer.model.comer import CoMERConfig
from fastcomer.search.options import SearchOptions
from fastcomer.search.search_slots import FeatureLayout, SearchSlots
from fastcomer.ops.dispatch import DispatchPlan
from support.launch_count import counting_launches

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (tests/run.sh does it)", allow_module_level=True)

MAX_LAUNCHES = 40  # the goal of issue 11


def test_beam_step_launches_at_most_40_kernels():
    torch.manual_seed(0)
    published = CoMERConfig()
    small = replace(published, d_model=16, dim_feedforward=16, dc=4, num_layers=1, growth_rate=4, dropout=0.0)
    changed = {name for name, value in asdict(small).items() if value != getattr(published, name)}
    assert changed <= {"d_model", "dim_feedforward", "dc", "num_layers", "growth_rate", "dropout"}  # widths only
    model = CoMER.from_config(small).eval()
    height, width = 1, 2
    options = SearchOptions(max_len=4)
    assert (options.beam_size, options.direction) == (10, "both")
    layout = FeatureLayout(height, width, torch.float32, torch.device("cpu"), DispatchPlan.of("triton", torch.float32, False))
    slots = SearchSlots(model.decoder, 2, options, layout)
    with torch.no_grad():
        slots.start(torch.randn(1, height, width, model.decoder.d_model), torch.zeros(1, height, width, dtype=torch.bool))
        slots.step(2)  # the first step: lazy initialisations (folded ARM, prepared weights) happen here
        with counting_launches() as counter:
            slots.step(2)
    launches = dict(counter.launches)
    fused = {name: n for name, n in launches.items() if name.startswith("triton:")}
    # per layer: self-attention block, cross-attention step (split L: the refinement on refining
    # layers, partial attention, merge), layer tail; one scorer per step
    assert fused == {"triton:_self_attention_step_kernel": 3, "triton:_refinement_kernel": 2,
                     "triton:_partial_attention_kernel": 3, "triton:_merge_kernel": 3,
                     "triton:_feed_forward_step_kernel": 3, "triton:_beam_scorer_kernel": 1}, launches
    assert counter.total <= MAX_LAUNCHES, launches
