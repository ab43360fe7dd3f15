"""Validate: everything about a recipe that can be checked before any heavy work, in one call.

``publisher validate`` and the start of ``publish`` share it, so a recipe that validates does not fail
later on something validation could have seen: the recipe's schema, its source's files and its card
template.
"""

from __future__ import annotations

from pathlib import Path

from publisher.card import check_template
from publisher.recipe import Recipe, load_recipe
from publisher.source import inspect_source


def validate_recipe(path: str | Path) -> Recipe:
    """Load and check the recipe at ``path``, its source and its card template, without converting anything.

    Raises:
        [`~publisher.errors.RecipeError`]:
            One line naming the file, the line and the field at fault.
    """
    recipe = load_recipe(path)
    check_template(recipe, inspect_source(recipe).family)
    return recipe
