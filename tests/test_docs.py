"""The documentation's links: every relative link in README.md and docs/*.md names a file that exists, and the
README links every document in docs/, so a moved or renamed file cannot leave a reader at a dead end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image outside fenced code blocks."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(text)]


def broken_links(path: Path) -> list[str]:
    """Relative links of ``path`` whose file (the part before any '#') does not exist, as 'file:line: target'."""
    out = []
    for line, target in links(path):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor in the same file
        if not (path.parent / target.split("#")[0]).exists():
            out.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}: {target}")
    return out


def test_there_are_documents() -> None:
    assert len(DOCS) >= 8, [p.name for p in DOCS]


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_the_readme_links_every_document() -> None:
    linked = {(ROOT / t.split("#")[0]).resolve() for _, t in links(ROOT / "README.md")}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


def test_a_broken_link_is_reported_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("x")
    doc = tmp_path / "doc.md"
    doc.write_text("# t\n[ok](there.md) [web](https://example.org) [anchor](#t)\n"
                   "![img](missing.png)\n```\n[in code](nowhere.md)\n```\n[bad](gone.md#part)\n")
    assert broken_links(doc) == [f"{doc}:3: missing.png", f"{doc}:7: gone.md#part"]
