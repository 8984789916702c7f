"""The documentation holds together: relative links resolve, the README stays a front door,
and every benchmark results table says when, at which commit and where it was measured."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
README_MAX_LINES = 320
STAMP = re.compile(r"measured \d{4}-\d{2}-\d{2}, commit [0-9a-f]{7,}")
STAMP_LOOKBACK_LINES = 4
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with code blocks blanked (line numbers kept)."""
    lines, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            lines.append("")
        else:
            lines.append("" if inside else line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(page.read_text()):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def relative_links(page: Path) -> list[str]:
    links = []
    for line in prose_lines(page.read_text()):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        links += [t for t in LINK.findall(line) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
    return links


def test_pages_exist():
    names = {p.name for p in DOCS}
    for expected in ("extraction.md", "sources.md", "cluster.md", "audit.md", "loader.md",
                     "cache-format.md", "exit-status.md", "benchmarks.md", "architecture.md"):
        assert expected in names, f"docs/{expected} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(f"{target}: no file {destination.relative_to(ROOT) if destination.is_relative_to(ROOT) else destination}")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with anchor #{anchor} in {destination.name}")
    assert not broken, f"{page.name}: broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md") if t.partition("#")[0]}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README.md does not link to: {', '.join(missing)}"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/ (limit {README_MAX_LINES})"


def test_readme_keeps_setup_and_test_sections():
    text = (ROOT / "README.md").read_text()
    for marker in ("<!-- section: setup -->", "<!-- /section: setup -->", "<!-- section: tests -->", "<!-- /section: tests -->"):
        assert marker in text, marker
    tests = text.split("<!-- section: tests -->")[1].split("<!-- /section: tests -->")[0]
    assert "python -m pytest -q tests" in tests and "pip install -r requirements-test.txt" in tests


def table_starts(lines: list[str]) -> list[int]:
    """Line numbers where a markdown table begins (header row followed by a |---| row)."""
    return [
        i for i in range(len(lines) - 1)
        if lines[i].lstrip().startswith("|") and re.match(r"^\s*\|\s*:?-{3,}", lines[i + 1])
        and not (i > 0 and lines[i - 1].lstrip().startswith("|"))
    ]


def test_every_benchmark_table_is_stamped():
    lines = prose_lines((ROOT / "docs" / "benchmarks.md").read_text())
    starts = table_starts(lines)
    assert starts, "docs/benchmarks.md has no results table"
    unstamped = [
        f"line {i + 1}: {lines[i][:60]}" for i in starts
        if not any(STAMP.search(lines[j]) for j in range(max(0, i - STAMP_LOOKBACK_LINES), i))
    ]
    assert not unstamped, "tables without a 'measured YYYY-MM-DD, commit SHA, machine' line above them:\n" + "\n".join(unstamped)


def test_slug_rules():
    assert github_slug("Audit report vs `du -s`") == "audit-report-vs-du--s"
    assert github_slug("Random 64^3 crops") == "random-643-crops"
    assert github_slug("Commit, resume, safety") == "commit-resume-safety"


def test_cache_format_metadata_table_is_generated_from_the_schema():
    from dinov3_cache.schema import schema_reference

    text = (ROOT / "docs" / "cache-format.md").read_text()
    table = text.split("<!-- schema-reference -->\n", 1)[1].split("<!-- /schema-reference -->", 1)[0]
    assert table == schema_reference(), "regenerate docs/cache-format.md's table from dinov3_cache.schema.schema_reference()"
