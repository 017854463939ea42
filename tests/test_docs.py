"""The user-facing pages: README length, relative links and anchors that resolve, nothing outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
#: pages written on another branch of issue 25; drop an entry once it is merged
PENDING = {REPO / "docs" / "departures.md"}


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Anchors of every heading of a page (code blocks skipped)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def relative_links(page: Path) -> list[str]:
    """Every link of a page that is not a URL, outside code blocks and inline code."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_slug_matches_github():
    assert slug("Claims → targets → outputs") == "claims--targets--outputs"
    assert slug("Reviewer's path: the headline on one GPU") == "reviewers-path-the-headline-on-one-gpu"


def test_readme_is_a_guide_of_at_most_350_lines():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= 350, f"README.md has {lines} lines; the guide's limit is 350 (details go to docs/)"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    missing = []
    for link in relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if target in PENDING and not target.exists():
            continue
        if not target.exists():
            missing.append(f"{link}: no file {target.relative_to(REPO)}")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            missing.append(f"{link}: no heading with anchor #{anchor} in {target.relative_to(REPO)}")
    assert not missing, f"{page.relative_to(REPO)}: " + "; ".join(missing)


#: folder names a repository file must never name (our team's notes, this machine's work tree); written
#: split so that this file does not name them either
OUTSIDE = re.compile("|".join(re.escape(name + "/") for name in ("sha" + "red", "/wo" + "rk")))


def test_names_nothing_outside_the_repository():
    """No page, source, rule, config or table names our team's private notes or a machine's folders."""
    suffixes = {".md", ".py", ".smk", ".yaml", ".csv", ".tsv", ".rst"}
    skipped = {"results", "logs", "resources", ".snakemake", ".git", ".pytest_cache", ".benchmarks"}
    files = [f for f in REPO.rglob("*") if f.suffix in suffixes and not skipped & set(f.relative_to(REPO).parts)]
    offending = [str(f.relative_to(REPO)) for f in files if OUTSIDE.search(f.read_text(errors="replace"))]
    assert files and not offending, f"files naming a path outside the repository: {offending}"
