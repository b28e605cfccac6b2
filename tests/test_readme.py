"""The README and docs/ stay true: the first commands, the settings table, the make targets they name."""

from __future__ import annotations

import re

import settings
from settings import ROOT

README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in (ROOT / "docs").glob("*.md")}


def test_readme_opens_with_the_two_commands():
    first_block = README.split("```", 2)[1]
    assert re.search(r"^make run\b", first_block, re.M) and re.search(r"^make test\b", first_block, re.M)


def test_settings_table_matches_the_code():
    table = DOCS["settings.md"].split("<!-- settings-table")[1].split("-->", 1)[1].split("<!-- /settings-table -->")[0]
    assert table.strip() == settings.markdown_table()


def test_env_example_names_every_setting():
    example = (ROOT / ".env.example").read_text()
    for option in settings.options():
        assert re.search(rf"^{option.env}=", example, re.M), option.env


def test_every_make_target_the_readme_names_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    for target in set(re.findall(r"`make ([a-z-]+)", "\n".join([README, *DOCS.values()]))):
        assert target in targets, target


def test_every_document_the_readme_links_exists():
    for link in re.findall(r"\]\((docs/[^)]+)\)", README):
        path, _, anchor = link.partition("#")
        assert (ROOT / path).is_file(), link
        if anchor:  # a heading of that document, as GitHub names its anchors
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
            assert anchor in {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}, link
