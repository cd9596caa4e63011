"""The optional dependencies (setup.py's extras): one check, one message naming the extra to install."""
import importlib.util


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message is one line naming the
    `pip install "fastcomer[extra]"` that installs it."""


def require(extra: str, *modules: str, purpose: str) -> None:
    """Raise MissingExtra unless every module is importable; "a|b" accepts either (a module
    renamed between versions)."""
    missing = [name for name in modules
               if not any(importlib.util.find_spec(choice) is not None for choice in name.split("|"))]
    if missing:
        names = ", ".join(name.split("|")[0] for name in missing)
        raise MissingExtra(f'{purpose} needs {names}, not installed: pip install "fastcomer[{extra}]"')
