"""The docs that are generated or checked against the code: the reference pages (scripts/make_reference.py),
the settings page's coverage of TrainConfig, the changelog's version and the README's length."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import tomllib

from clara.config import TrainConfig
from tests.helpers import REPO


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_pages_are_what_the_script_makes_from_the_code():
    stale = [
        path
        for path, text in load_script("make_reference").pages().items()
        if (REPO / path).read_text(encoding="utf-8") != text
    ]
    assert not stale, f"out of date: {stale}; run python scripts/make_reference.py"


def test_the_settings_page_lists_every_trainconfig_field():
    page = (REPO / "docs" / "reference" / "settings.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip() for line in page.splitlines() if line.startswith("| `")}
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`{f.name.upper()}`" not in rows]
    assert not missing, f"settings missing from docs/reference/settings.md: {missing}"


def test_the_changelog_names_the_package_version_first():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    headings = re.findall(r"^## \[?(\d+\.\d+\.\d+)", (REPO / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert headings[:1] == [version], headings


def test_the_readme_is_at_most_250_lines():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
