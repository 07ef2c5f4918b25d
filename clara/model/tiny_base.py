"""The built-in tiny base model as checkpoints see it: where the shipped build is, which recipe built it, and
where builds of other recipes are kept (standard library only; the builder is clara.training.tiny). The example files
its recipe reads are found here too, so the recipe's code does not name its own place."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "tiny_model"
RECIPE_FILE = "recipe.json"
# A checkout's example/ (an installed package has none; only building the tiny model needs it).
EXAMPLE_DIR = Path(__file__).resolve().parent.parent.parent / "example"


def clara_home() -> Path:
    """Where builds of other recipes are kept, for checkpoints trained on them (see
    clara.model.checkpoint.tiny_base_for)."""
    return Path(os.environ.get("CLARA_HOME") or Path.home() / ".cache" / "clara")


def tiny_model_dir() -> str:
    """Directory of the shipped tiny model."""
    if not (SHIPPED_DIR / RECIPE_FILE).is_file():
        raise FileNotFoundError(
            f"{SHIPPED_DIR / RECIPE_FILE}: the built-in tiny model is missing; "
            f"rebuild it with `python -m clara.tiny --out {SHIPPED_DIR}`"
        )
    return str(SHIPPED_DIR)


def read_recipe(model_dir: str) -> dict:
    """What a build recorded about itself: its version (the recipe hash), seed and steps."""
    with open(Path(model_dir) / RECIPE_FILE, encoding="utf-8") as handle:
        return json.load(handle)


@functools.cache
def tiny_version() -> str:
    """The recipe hash the shipped model was built from (checkpoints record it)."""
    return read_recipe(tiny_model_dir())["version"]


@functools.cache
def shipped_versions() -> frozenset[str]:
    """Every version that names the shipped weights: the recipe hash, and the hashes an earlier clara gave
    the same recipe (recipe.json's earlier_versions: the hash covered the code's text then, so checkpoints
    trained before it covered the code's meaning record another name for these weights)."""
    return frozenset([tiny_version(), *read_recipe(tiny_model_dir()).get("earlier_versions", [])])
