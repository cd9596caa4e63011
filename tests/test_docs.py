"""The README and the documentation pages against the repository: the README's length and its
opening commands, its backend table against the op table, every repository path and
`fastcomer.` name they cite, and the op files table of docs/kernels.md against the packages.
(`mkdocs build --strict`, which .ci/run runs, checks the links and the API pages.)"""
import importlib
import re

import pytest

from fastcomer.ops.registry import OPS
from support.paths import REPO

README = REPO / "README.md"
PAGES = sorted((REPO / "docs").rglob("*.md")) + [REPO / "benchmarks" / "README.md"]
OPENING_COMMANDS = (
    "pip install torch==2.13.0 && pip install -e . && python -m fastcomer bench --quick",
    "bash .ci/run",
)
MAX_README_LINES = 150

# A path into the repository: a top folder, then path characters; `<op>`, `*` or DATE mark a pattern.
REPO_PATH = re.compile(r"(?<![\w./-])((?:fastcomer|tests|benchmarks|csrc|docs|\.ci)/[\w./<>*-]*)")
FASTCOMER_NAME = re.compile(r"(?<![\w.:])fastcomer(?:\.[A-Za-z_]\w*)+")
PATTERN_MARKS = ("<", "*", "DATE")
NOT_IMPORTABLE = {"fastcomer._C"}  # the CUDA extension, built only where nvcc is


def section(text: str, name: str) -> str:
    """The lines between the README's snippet markers `[start:name]` and `[end:name]`."""
    match = re.search(rf"\[start:{name}\][^\n]*\n(.*?)\n[^\n]*\[end:{name}\]", text, re.S)
    assert match, f"no section {name!r}"
    return match.group(1)


def table_rows(text: str, header: str):
    """The cells of the markdown table whose header row starts with `header`."""
    lines = text[text.index(header):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_readme_is_short_and_opens_with_its_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"
    assert lines[0] == "# fastcomer" and lines[1] == "" and lines[2] == "```bash"
    for line, command in zip(lines[3:5], OPENING_COMMANDS):
        assert line.split("#")[0].strip() == command
    assert lines[5] == "```"


def test_readme_backend_table_is_the_op_table():
    rows = table_rows(section(README.read_text(), "backends"), "| op |")
    assert [row[0] for row in rows] == [f"`{name}`" for name in OPS]
    assert [row[2] for row in rows] == [", ".join(op.backends) for op in OPS.values()]


def test_op_files_table_matches_the_packages():
    rows = table_rows((REPO / "docs" / "kernels.md").read_text(), "| file | what | ops that have it |")
    documented = {}
    for file, _, ops in rows:
        documented[file.strip("`")] = set(OPS) if ops == "all" else {op.strip() for op in ops.split(",")}
    found = {}
    for name in OPS:
        for path in (REPO / "fastcomer" / "ops" / name).glob("*.py"):
            found.setdefault(path.name, set()).add(name)
    assert documented == found


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda path: str(path.relative_to(REPO)))
def test_cited_paths_exist(page):
    missing = []
    for match in REPO_PATH.finditer(page.read_text()):
        path = match.group(1).rstrip(".,:;")
        if any(mark in path for mark in PATTERN_MARKS):
            continue
        if not (REPO / path).exists():
            missing.append(path)
    assert not missing, f"{page.name} cites paths that do not exist: {missing}"


def resolve(name: str):
    """The object a dotted `fastcomer.` name denotes: attributes first (`fastcomer.vocab` is the
    package's Vocab instance), else the submodule of that name."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda path: str(path.relative_to(REPO)))
def test_cited_names_exist(page):
    missing = []
    for name in sorted(set(FASTCOMER_NAME.findall(page.read_text())) - NOT_IMPORTABLE):
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"{page.name} cites names that do not exist: {missing}"


# A docstring or comment citing a page and its sections: docs/function.md, 'Beam search', 'Rescoring'
OUTSIDE_CITATION = "SPEC" + " section"  # the contract document outside the repository, cited so before
CITATION = re.compile(r"docs/([\w/]+\.md), ((?:'[^']+'(?:, )?)+)")


def headings(page) -> set:
    return {line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")}


def test_code_cites_existing_pages_and_sections():
    sources = [*(REPO / "fastcomer").rglob("*.py"), *(REPO / "tests").rglob("*.py"), *(REPO / "csrc").glob("*")]
    cited, wrong = 0, []
    for source in sources:
        text = source.read_text()
        assert OUTSIDE_CITATION not in text, f"{source} cites a document outside the repository; cite a docs/ page"
        for page, sections in CITATION.findall(text):
            cited += 1
            path = REPO / "docs" / page
            missing = set(re.findall(r"'([^']+)'", sections)) - (headings(path) if path.exists() else set())
            if missing:
                wrong.append(f"{source.relative_to(REPO)}: docs/{page} {sorted(missing)}")
    assert cited, "no citation found: the pattern is out of date"
    assert not wrong, wrong
