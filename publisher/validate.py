"""Validate: everything about a recipe that can be checked before any heavy work, in one call.

``publisher validate`` and the start of ``publish`` share it, so a recipe that validates does not fail
later on something validation could have seen: the recipe's schema, its source's files and its card
template.
"""

from __future__ import annotations

from pathlib import Path

from publisher.card import check_template
from publisher.language_model_source import inspect_language_model
from publisher.recipe import Recipe, load_recipe
from publisher.source import inspect_source, with_source_components


def validate_recipe(path: str | Path) -> Recipe:
    """Load and check the recipe at ``path``, its source and its card template, without converting anything.

    Returns:
        [`~publisher.recipe.Recipe`]: the recipe, without the optional default components its (local) source lacks.

    Raises:
        [`~publisher.errors.RecipeError`]:
            One line naming the file, the line and the field at fault.
    """
    recipe = load_recipe(path)
    if recipe.task == "text-generation":
        check_template(recipe, inspect_language_model(recipe))
        return recipe
    info = inspect_source(recipe)
    check_template(recipe, info.family)
    return with_source_components(recipe, info.components) if info.components else recipe
