"""The documentation in the repository: links that resolve inside it, nothing outside
it, and a runbook entry for every alert."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


def links(path: Path) -> list[str]:
    return LINK_RE.findall(path.read_text())


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve_inside_the_repository(page: Path) -> None:
    for target in links(page):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = (page.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(REPO), f"{page.name} links outside the repo: {target}"
        assert resolved.exists(), f"{page.name} links to a missing {target}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_refers_to_files_outside_the_repository(page: Path) -> None:
    text = page.read_text()
    assert "../shared" not in text and "DESIGN.md" not in text


def test_the_readme_links_to_each_page_of_the_docs() -> None:
    targets = set(links(REPO / "README.md"))
    for page in ("docs/architecture.md", "docs/operations.md", "docs/configuration.md"):
        assert page in targets, page


def test_every_alert_has_a_runbook_section() -> None:
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "herald-rules.yaml").read_text())
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 7
    headings = re.findall(r"^### (\w+)", (REPO / "docs" / "operations.md").read_text(),
                          re.MULTILINE)
    assert sorted(a for a in headings if a.startswith("Herald")) == sorted(alerts)
