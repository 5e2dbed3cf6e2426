"""Every reference in the repository's code and docs resolves inside the repository.

Scanned: the pack, its tests, scripts and docs (``SCANNED``). A reference is
- a Markdown document named in the text (``docs/algorithms.md``, ``testbed/README.md``, a bare result file
  name such as ``bench-20261127-120520.md``): it must exist, relative to the repository root or to the citing
  file, or (bare names) somewhere in the repository;
- a section sign: ``docs/algorithms.md §3.3`` must be a numbered heading of that document, a bare ``§8`` in a
  Markdown file one of that file's own; after a paper citation (``arXiv 2403.19776, §3.2``, ``et al.``) it is the
  paper's section and is not checked; anywhere else in code it names no document and fails;
- a Markdown link with an anchor (``[x](environment.md#gradients-inside-sampling-clora)``): the anchor must be
  a heading of the linked document;
- and nothing may cite what only exists outside the repository: design notes by name (``SPEC``) or issue
  numbers (``issue 9``), which a reader of the repository cannot open.
"""
from __future__ import annotations

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCANNED = ("multilora", "nodes", "tests", "bench", "testbed", "demo", "js", "docs", "example_workflows",
           "README.md", "Makefile", "pyproject.toml", "__init__.py", ".comfyignore")
SKIPPED_DIRS = {"__pycache__", "artifacts", "node_modules", "weights", "results"}  # results: run records
EXTENSIONS = (".py", ".md", ".js", ".sh", ".toml", ".txt", ".json")
THIS_FILE = os.path.abspath(__file__)

MD_PATH = re.compile(r"(?<![\w/.<>-])((?:[\w.-]+/)*[\w-][\w.-]*\.md)(?![\w/])")
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)(?:\s?[–-]\s?(\d+(?:\.\d+)*))?")
PAPER = re.compile(r"arXiv|et al\.|paper", re.IGNORECASE)
SEGMENT_START = re.compile(r".*[;()\[\]]|.*§\s?\d+(?:\.\d+)*")
LINK_ANCHOR = re.compile(r"\]\(([^)\s#]*)#([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
SECTION_HEADING = re.compile(r"^(\d+(?:\.\d+)*)[.\s]")
OUTSIDE = (re.compile(r"\bSPEC\b"), re.compile(r"\b[Ii]ssues?\s+#?\d+"), re.compile(r"\(#\d+\)"))
PLACEHOLDER_DIR = re.compile(r"[A-Z][A-Z_]*")  # DIR/results.md: an output path in a usage line


def scanned_files() -> list[str]:
    out = []
    for entry in SCANNED:
        path = os.path.join(REPO, entry)
        if os.path.isfile(path):
            out.append(path)
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("."))
            out += [os.path.join(root, f) for f in sorted(files) if f.endswith(EXTENSIONS)]
    return [f for f in out if os.path.abspath(f) != THIS_FILE]


def repository_files() -> dict[str, list[str]]:
    """Basename → paths of every file of the repository (venvs, caches and git's folder left out)."""
    names: dict[str, list[str]] = {}
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in {"__pycache__", "node_modules"}]
        for f in files:
            names.setdefault(f, []).append(os.path.join(root, f))
    return names


FILES = scanned_files()
NAMES = repository_files()


def resolve(reference: str, cited_in: str) -> str | None:
    for base in (REPO, os.path.dirname(cited_in)):
        path = os.path.normpath(os.path.join(base, reference))
        if os.path.isfile(path):
            return path
    if "/" not in reference and reference in NAMES:
        return NAMES[reference][0]
    return None


def headings(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [m.group(1) for m in map(HEADING.match, f.read().splitlines()) if m]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def section_numbers(path: str) -> set[str]:
    return {m.group(1) for m in map(SECTION_HEADING.match, headings(path)) if m}


def rel(path: str) -> str:
    return os.path.relpath(path, REPO)


def problems_of(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    out = []
    for number, line in enumerate(lines, start=1):
        where = f"{rel(path)}:{number}"
        for pattern in OUTSIDE:
            for m in pattern.finditer(line):
                out.append(f"{where}: '{m.group(0)}' cites something outside the repository; cite a file in docs/ "
                           "or drop it")
        for m in MD_PATH.finditer(line):
            reference = m.group(1)
            first = reference.split("/")[0]
            if "/" in reference and PLACEHOLDER_DIR.fullmatch(first):
                continue
            if resolve(reference, path) is None:
                out.append(f"{where}: '{reference}' does not exist in the repository")
        for m in SECTION.finditer(line):
            before = line[:m.start()]
            cut = SEGMENT_START.match(before)
            segment = before[cut.end():] if cut else before
            docs = MD_PATH.findall(segment)
            if docs:
                target = resolve(docs[-1], path)
            elif PAPER.search(segment):
                continue
            elif path.endswith(".md"):
                target = path
            else:
                out.append(f"{where}: '{m.group(0)}' names no document; write e.g. 'docs/algorithms.md "
                           f"{m.group(0)}'")
                continue
            if target is None:
                continue  # reported above as a missing document
            have = section_numbers(target)
            for wanted in filter(None, m.groups()):
                if wanted not in have:
                    out.append(f"{where}: '{m.group(0)}': {rel(target)} has no section {wanted} "
                               f"(its numbered headings: {sorted(have)})")
        if path.endswith(".md"):
            for m in LINK_ANCHOR.finditer(line):
                target = resolve(m.group(1), path) if m.group(1) else path
                if target is not None and target.endswith(".md") and \
                        m.group(2) not in {slug(h) for h in headings(target)}:
                    out.append(f"{where}: anchor '#{m.group(2)}' is not a heading of {rel(target)}")
    return out


@pytest.mark.parametrize("path", FILES, ids=rel)
def test_references_resolve(path):
    problems = problems_of(path)
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_should(tmp_path):
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n## 1. One\nSee §1 and §2, SPEC §3, issue 12, docs/algorithms.md §99, "
                   "missing-file.md, [a](#1-one) and [b](#two).\n", encoding="utf-8")
    found = "\n".join(problems_of(str(doc)))
    for expected in ("has no section 2", "'SPEC'", "'issue 12'", "has no section 99", "'missing-file.md' does not",
                     "anchor '#two'"):
        assert expected in found
    assert "has no section 1 " not in found and "'#1-one'" not in found
    code = tmp_path / "mod.py"
    code.write_text('"""CMLoRA (Zou et al. 2025, arXiv 2502.04923, §3.3), then §4 alone."""\n', encoding="utf-8")
    found = problems_of(str(code))
    assert len(found) == 1 and "'§4' names no document" in found[0]


def test_the_clone_url_is_the_registry_repository():
    """README's `git clone` and pyproject's Repository URL are the same placeholder, changed together."""
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        repository = re.search(r'^Repository\s*=\s*"([^"]+)"', f.read(), re.MULTILINE).group(1)
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        clones = re.findall(r"git clone (\S+)", f.read())
    assert clones and all(url == repository for url in clones), (clones, repository)
