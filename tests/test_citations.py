"""The repository is self-contained: no file cites a document that is not in it, and no markdown link points at a
missing file.

Citations belong to the paper (arXiv 2604.12946, by section, table, equation or algorithm), the official code by
file at commit dee8363 (github.com/sandyresearch/parcae), other public code by repository and file, or our own
docs (docs/design.md). This test fails listing every tracked file and line that cites one of the project's
private planning documents instead, and every relative markdown link whose target does not exist.

    pytest tests/test_citations.py -q
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Names of documents that were never part of the repository (a reader cannot follow them), and paths that
# reach outside the repository root.
# (Written in pieces so that this file does not match its own pattern.)
OUTSIDE_DOCUMENT = re.compile(
    r"REFERENCE" r"_IMPL|PAPER(?:\.md)? ?§|PAPER\.md|LAYOUT\.md|ECO" r"SYSTEM(?:\.md)?|"
    r"\.\./shared|shared/(?:docs|fixtures)")
# [text](target) and ![alt](target); the target ends at whitespace (a title may follow) or the closing parenthesis.
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing to list tracked files with")
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary: images, checkpoints, fixtures
        files.append(path)
    assert files, "git ls-files listed no text files"
    return files


def outside_citations(files: list[Path]) -> list[str]:
    hits = []
    for path in files:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE_DOCUMENT.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    return hits


def broken_links(files: list[Path]) -> list[str]:
    broken = []
    for path in files:
        if path.suffix.lower() not in (".md", ".markdown"):
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for target in MARKDOWN_LINK.findall(line):
                if target.startswith("#") or URL_SCHEME.match(target):
                    continue  # in-page anchor, or a web / mail address
                relative = target.split("#", 1)[0]
                resolved = (ROOT / relative.lstrip("/")) if relative.startswith("/") else (path.parent / relative)
                inside = ROOT in resolved.resolve().parents or resolved.resolve() == ROOT
                if not inside or not resolved.exists():
                    broken.append(f"{path.relative_to(ROOT)}:{lineno}: ({target})")
    return broken


def test_no_citation_of_documents_outside_the_repository():
    hits = outside_citations(tracked_text_files())
    assert not hits, ("cite the paper, the official code by file at dee8363, or docs/design.md instead of:\n"
                      + "\n".join(hits))


def test_markdown_links_point_at_files_in_the_repository():
    broken = broken_links(tracked_text_files())
    assert not broken, "markdown links to files that do not exist in the repository:\n" + "\n".join(broken)


def test_the_checks_catch_what_they_look_for():
    """Both checks flag a planted citation and a planted dead link (so an empty result means something)."""
    doc = ROOT / "docs" / "design.md"
    assert doc.is_file(), "docs/design.md must exist: it is where explanations and differences live"
    assert OUTSIDE_DOCUMENT.search("as in " + "REFERENCE" + "_IMPL §7")
    assert OUTSIDE_DOCUMENT.search("(" + "PAPER" + " §3.2)") and OUTSIDE_DOCUMENT.search("see ../" + "shared/x")
    assert not OUTSIDE_DOCUMENT.search("PAPER_PARAMETER_COUNTS and paper §2.1, Table 18")
    links = MARKDOWN_LINK.findall("see [a](docs/x.md#sec), ![b](img/p.png \"t\"), [c](https://x.org/y), [d](#top)")
    assert links == ["docs/x.md#sec", "img/p.png", "https://x.org/y", "#top"]
