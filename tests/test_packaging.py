"""Packaging: one source for the version, py.typed shipped, type hints on the public API."""
import inspect
import subprocess
import sys

import fastcomer
from support.paths import REPO


def test_setup_reads_the_package_version():
    done = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, capture_output=True, text=True,
                          env={"FASTCOMER_CUDA": "0", "PATH": ""}, check=True)
    assert done.stdout.strip().splitlines()[-1] == fastcomer.__version__
    assert "0.1.0" not in (REPO / "setup.py").read_text()  # no second copy of the number


def test_py_typed_is_shipped():
    assert (REPO / "fastcomer" / "py.typed").is_file()
    assert '"py.typed"' in (REPO / "setup.py").read_text()


def public_functions():
    for name in sorted(dir(fastcomer)):
        obj = getattr(fastcomer, name)
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj) and obj.__module__.startswith("fastcomer"):
            for attr, member in vars(obj).items():
                if inspect.isfunction(member) and (not attr.startswith("_") or attr == "__init__"):
                    yield f"{name}.{attr}", member


def test_public_api_has_type_hints():
    missing = {}
    for name, fn in public_functions():
        signature = inspect.signature(fn)
        params = {p.name for p in signature.parameters.values()
                  if p.annotation is inspect.Parameter.empty and p.name not in ("self", "cls")
                  and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if params or (signature.return_annotation is inspect.Signature.empty and not name.endswith("__init__")):
            missing[name] = sorted(params) + ([] if signature.return_annotation is not inspect.Signature.empty else ["return"])
    assert not missing, f"public API without type hints: {missing}"
