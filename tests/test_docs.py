"""The documentation: a short front page, every setting documented once, no broken links.

The README is the front page and docs/ holds one file per topic; the checks here keep the
move honest as both change: a setting added to worker/settings.py without a row in
docs/settings.md, a heading renamed under a link that points at it, or a front page that
grows back into a manual fails the suite.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from worker.settings import documented_settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SETTINGS_DOC = ROOT / "docs" / "settings.md"
FRONT_PAGE_MAX_LINES = 250

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"`[^`]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_SETTING_ROW = re.compile(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks: a `# comment` in a shell sample is no heading."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for line in prose_lines(path.read_text()):
        match = _HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            found.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return found


def relative_links(path: Path) -> list[str]:
    """The targets of the Markdown links in prose that point inside the repository."""
    targets = []
    for line in prose_lines(path.read_text()):
        for target in _LINK.findall(_INLINE_CODE.sub("", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                targets.append(target)
    return targets


def broken_links(path: Path) -> list[str]:
    """Each relative link of `path` whose file, or whose #anchor in that file, does not exist."""
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


def test_the_slugs_follow_githubs_rules() -> None:
    assert github_slug("Retention on PostgreSQL: daily partitions") == "retention-on-postgresql-daily-partitions"
    assert github_slug("Running it with Celery yourself") == "running-it-with-celery-yourself"
    assert github_slug("The `status` command, step 2") == "the-status-command-step-2"
    assert github_slug("PostgreSQL and scaling out") == "postgresql-and-scaling-out"


def test_repeated_headings_and_code_comments(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## On PostgreSQL\n\n```sh\n# not a heading\n```\n\n## On PostgreSQL\n")
    assert anchors(page) == {"title", "on-postgresql", "on-postgresql-1"}


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#a-section) [ok](#page) [web](https://example.com/x.md)\n"
        "[gone](missing.md) [no anchor](other.md#b-section) `[code](not-a-link.md)`\n"
    )
    assert broken_links(page) == [
        f"missing.md: no file {tmp_path / 'missing.md'}",
        "other.md#b-section: no heading #b-section in other.md",
    ]


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda path: path.name)
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_the_readme_is_a_front_page_that_links_every_topic() -> None:
    assert len(README.read_text().splitlines()) < FRONT_PAGE_MAX_LINES
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(README)}
    assert [doc.name for doc in DOCS if doc.resolve() not in linked] == []


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_each_topic_says_what_it_is_and_links_back(path: Path) -> None:
    title, blank, description = path.read_text().splitlines()[:3]
    assert title.startswith("# ") and blank == ""
    assert "](../README.md)" in description


def test_every_setting_is_documented_once_with_its_default() -> None:
    """Every variable Settings.from_env reads (a field, upper-cased) has exactly one table row."""
    rows = [match.groups() for line in SETTINGS_DOC.read_text().splitlines() if (match := _SETTING_ROW.match(line))]
    counts = Counter(name for name, _ in rows)
    expected = {name: str(default) for name, default, _ in documented_settings()}
    assert {name: count for name, count in counts.items() if count != 1} == {}
    assert dict(rows) == expected
