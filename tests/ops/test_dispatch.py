"""The op contract (every op package of ops/registry.py has its files and functions) and the
dispatch: requests parsed in one place, a forced backend that an op cannot honour raises naming
the op (a test per op: never a fallback), a search's plan resolved once from its request."""
import importlib
from pathlib import Path

import pytest
import torch

from fastcomer.ops import dispatch
from fastcomer.ops.dispatch import DispatchPlan, decoding_plan, parse_request, plan_for, resolve
from fastcomer.ops.registry import BACKEND_MODULES, DECODING_OPS, OPS

from support.random_models import random_model

OPS_DIR = Path(importlib.import_module("fastcomer.ops").__file__).parent
CPU_FLOAT32 = torch.zeros(1)


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_package_keeps_the_contract(name):
    """The entry, a module per backend with a function named after the op, the custom op under
    the op's name, the report's variants; torch (the reference) is the last of auto's preferences."""
    op = OPS[name]
    files = {path.name for path in (OPS_DIR / name).glob("*.py")}
    assert {"__init__.py", "reference.py", "triton_kernel.py", "custom_op.py", "variants.py"} <= files, files
    assert ("cuda_kernel.py" in files) == ("cuda" in op.backends)
    assert op.backends[-1] == "torch" and len(set(op.backends)) == len(op.backends)
    assert callable(op.entry()) and op.entry().__name__ == name
    # the backend modules without triton: importing a kernel module imports triton, which the
    # plain suite may lack; its source must still define the function
    for backend in op.backends:
        source = (OPS_DIR / name / f"{BACKEND_MODULES[backend]}.py").read_text()
        assert f"\ndef {name}(" in source, f"{name}/{BACKEND_MODULES[backend]}.py defines no {name}()"
    assert callable(op.implementation("torch"))
    importlib.import_module(f"{op.package}.custom_op")
    assert hasattr(torch.ops.fastcomer, name), f"torch.ops.fastcomer.{name} is not registered"
    # a torch.library.custom_op with a registered fake (its default fake only raises)
    assert torch._library.custom_ops.OPDEFS[op.custom_op]._abstract_fn is not None, \
        f"{op.custom_op} has no fake implementation"


@pytest.mark.parametrize("name", sorted(OPS))
def test_a_forced_backend_the_op_lacks_raises_naming_it(name):
    missing = [backend for backend in ("cuda", "triton") if backend not in OPS[name].backends]
    for backend in missing:
        with pytest.raises(ValueError, match=f"{name} has no '{backend}' implementation"):
            resolve(name, CPU_FLOAT32, backend)


@pytest.mark.parametrize("name", sorted(OPS))
def test_a_forced_kernel_backend_that_cannot_run_raises(name, monkeypatch):
    """CPU tensors without the interpreter, float64, no extension: each a clear error, never
    the torch path instead."""
    monkeypatch.setattr(dispatch, "triton_interpreter", lambda: False)
    monkeypatch.setattr(dispatch, "triton_status", lambda: (True, "ok"))
    monkeypatch.setattr(dispatch, "cuda_extension_usable", lambda: False)
    for backend in OPS[name].backends[:-1]:
        with pytest.raises((RuntimeError, ValueError), match=f"backend '{backend}' .*{name}"):
            resolve(name, CPU_FLOAT32, backend)
        with pytest.raises(ValueError, match=f"backend '{backend}' \\({name}\\) runs .*float64"):
            resolve(name, CPU_FLOAT32.double(), backend)
    assert resolve(name, CPU_FLOAT32, "torch") == resolve(name, CPU_FLOAT32, "auto") == "torch"


@pytest.mark.parametrize("name", sorted(name for name, op in OPS.items() if "cuda" not in op.backends))
def test_a_per_op_request_of_a_missing_backend_raises(name):
    """'cuda' forced on an op without a CUDA implementation through a per-op request raises too."""
    with pytest.raises(ValueError, match=f"{name} has no 'cuda' implementation"):
        resolve(name, CPU_FLOAT32, {name: "cuda"})


def test_requests_are_checked_in_one_place(monkeypatch):
    assert parse_request("Triton ") == "triton"
    assert parse_request({"cross_attention_step": "torch"}) == {"cross_attention_step": "torch"}
    with pytest.raises(ValueError, match="must be one of"):
        parse_request("cudnn")
    with pytest.raises(ValueError, match="unknown op"):
        parse_request({"decode_step": "torch"})
    monkeypatch.setenv("FASTCOMER_BACKEND", "cross_attention_step=torch, beam_scorer_step=auto")
    assert parse_request(None) == {"cross_attention_step": "torch", "beam_scorer_step": "auto"}
    monkeypatch.setenv("FASTCOMER_BACKEND", "cross_attention_step=fast")
    with pytest.raises(ValueError, match="FASTCOMER_BACKEND"):
        parse_request(None)


def test_a_mapping_forces_one_op_and_leaves_the_others_to_auto(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_interpreter", lambda: True)
    monkeypatch.setattr(dispatch, "triton_status", lambda: (True, "ok"))
    request = {"cross_attention_step": "triton"}
    assert resolve("cross_attention_step", CPU_FLOAT32, request) == "triton"
    assert resolve("self_attention_step", CPU_FLOAT32, request) == "torch"  # auto: CPU tensors run torch


def test_the_plan_of_a_search():
    model = random_model(0)
    feature = torch.zeros(1, 2, 3, model.config.d_model)
    plan = decoding_plan(model.decoder, feature)
    assert plan == DispatchPlan.of("torch", torch.float32, graphs=False)
    assert [op for op, _ in plan.backends] == list(DECODING_OPS)
    assert plan["cross_attention_step"] == "torch" and plan.coverage_dtype == torch.float32
    assert decoding_plan(model.decoder, feature.double()).coverage_dtype == torch.float64
    assert DispatchPlan.of("triton", torch.bfloat16, False).coverage_dtype == torch.float32  # kernels keep float32
    with pytest.raises(ValueError, match="CUDA graphs were requested"):
        decoding_plan(model.decoder, feature, graphs=True)
    with pytest.raises(ValueError, match="self_attention_step has no 'cuda' implementation"):
        plan_for(torch.device("cpu"), torch.float32, 8, 32, 32, request="cuda")
    hash(plan)  # kept buffers are keyed on it


def test_a_search_checks_its_request_before_any_work(monkeypatch):
    """A bad request fails before the encoder runs."""
    import fastcomer

    model = random_model(0)
    ran = []
    monkeypatch.setattr(type(model.encoder), "forward", lambda *args: ran.append(1))
    img, mask = torch.zeros(1, 1, 32, 32), torch.zeros(1, 32, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match="must be one of"):
        fastcomer.beam_search(model, img, mask, beam_size=2, max_len=4, backend="fast")
    with pytest.raises(ValueError, match="CUDA graphs were requested"):
        fastcomer.beam_search(model, img, mask, beam_size=2, max_len=4, graphs=True)
    with pytest.raises(TypeError, match="graphs must be a bool"):
        fastcomer.beam_search(model, img, mask, beam_size=2, max_len=4, graphs="yes")
    assert not ran


def test_env_report_shows_the_plan():
    report = dispatch.env_report()
    assert set(report["ops"]) == set(OPS)
    assert report["plan (float32, published sizes)"]["cpu"].startswith("self_attention_step: torch")
    forced = dispatch.env_report("cuda")
    assert "cannot run" in forced["plan (float32, published sizes)"]["cpu"]
