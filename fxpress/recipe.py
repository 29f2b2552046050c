"""Recipes: a list of passes with their fields, as versioned JSON/YAML that round-trips."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fxpress.artifact_names import RECIPE_KEY
from fxpress.atomic import write_atomic
from fxpress.errors import RecipeError
from fxpress.passes.base import Pass, pass_from_dict

RECIPE_FORMAT = 1


def recipe_dict(passes: Sequence[Pass]) -> dict[str, Any]:
    return {RECIPE_KEY: RECIPE_FORMAT, "passes": [p.to_dict() for p in passes]}


def passes_from_recipe(data: Any) -> list[Pass]:
    """Build passes from a recipe mapping (or a bare list of entries); every name and field is checked."""
    if isinstance(data, dict):
        version = data.get(RECIPE_KEY, RECIPE_FORMAT)
        if version != RECIPE_FORMAT:
            raise RecipeError(f"recipe format {version} is not supported: this fxpress reads format {RECIPE_FORMAT}")
        entries = data.get("passes")
    else:
        entries = data
    if not isinstance(entries, list):
        raise RecipeError("a recipe must be a list of passes or a mapping with a 'passes' list")
    out = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"type": entry}
        try:
            out.append(pass_from_dict(entry))
        except RecipeError as err:
            raise RecipeError(f"recipe entry {index}: {err}") from None
    return out


def load_recipe(path: str | os.PathLike) -> list[Pass]:
    """Read a .json or .yaml/.yml recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:
        raise RecipeError(f"recipe file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {err}") from err
    return passes_from_recipe(data)


def save_recipe(passes: Sequence[Pass], path: str | os.PathLike) -> Path:
    """Write the recipe atomically as JSON (or YAML for .yaml/.yml)."""
    path = Path(path)
    data = recipe_dict(passes)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return path
