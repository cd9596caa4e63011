"""Helpers shared by the tests (on sys.path through pyproject's pytest pythonpath)."""
