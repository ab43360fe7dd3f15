"""The recipe matrix: the publish workflow's first job (``publisher changed-recipes BASE HEAD``).

The recipes a push changed, each with its name and target repo (the key of the publish job's
``concurrency``), as GitHub's ``strategy.matrix``.
"""

from __future__ import annotations

import json
from pathlib import Path

from publisher.commands import run_tool
from publisher.components import NAMES as COMPONENTS
from publisher.errors import PublisherError
from publisher.recipe import load_recipe

RECIPES_DIR = "recipes"
RECIPE_SUFFIXES = (".yaml", ".yml")
# GitHub's `github.event.before` when the pushed branch did not exist before.
ZERO_SHA = "0" * 40



def _commit(root: Path, revision: str) -> str:
    try:
        return run_tool(["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"], root).strip()
    except PublisherError:
        raise PublisherError(
            f"{revision!r} is not a commit of the git repository at {root.resolve()}"
            " (a shallow clone? check out with fetch-depth: 0)"
        ) from None


def changed_recipes(base: str, head: str, root: Path = Path()) -> list[str]:
    """The recipes (paths relative to ``root``, sorted) that changed between the commits ``base`` and ``head``.

    A recipe changed when its own file did, or any file in a local folder or file it reads (source, VAE or
    ControlNet folder, card template, mixed-bit recipe), deletions included. ``root`` must have ``head``
    checked out: recipes are read from its working tree. A ``base`` of all zeros (the branch's first push)
    selects every recipe.
    """
    head_commit = _commit(root, head)
    checked_out = _commit(root, "HEAD")
    if head_commit != checked_out:
        raise PublisherError(
            f"{root.resolve()} has {checked_out[:10]} checked out, not {head} ({head_commit[:10]}):"
            " recipes are read from the working tree, so check out HEAD first"
        )
    listed = run_tool(["git", "ls-files", "-z", "--", RECIPES_DIR], root).split("\0")
    recipes = sorted(path for path in listed if path.endswith(RECIPE_SUFFIXES))
    if base == ZERO_SHA:
        return recipes
    diff = ["git", "diff", "--name-only", "-z", "--no-renames", _commit(root, base), head_commit, "--", RECIPES_DIR]
    changed = {path for path in run_tool(diff, root).split("\0") if path}
    others = [root.resolve() / path for path in sorted(changed - set(recipes))]
    return [path for path in recipes if path in changed or (others and _reads_any(root / path, others))]


def _reads_any(recipe_file: Path, files: list[Path]) -> bool:
    recipe = load_recipe(recipe_file)
    source = recipe.source
    inputs = [source.path, recipe.card.template]
    inputs += [model.path for model in (source.vae, source.controlnet) if model is not None]
    inputs += [scheme.palettize.mixed.recipe for scheme in map(recipe.compression.for_component, COMPONENTS)
               if scheme.palettize and scheme.palettize.mixed]
    return any(file.is_relative_to(path) for path in inputs if path is not None for file in files)


def recipe_matrix(recipes: list[str], root: Path = Path()) -> dict[str, list[dict[str, str]]]:
    """GitHub's ``strategy.matrix`` publishing ``recipes``: each one's path, name and target repo."""
    include = []
    for path in recipes:
        recipe = load_recipe(root / path)
        include.append({"recipe": path, "name": recipe.name, "repo": recipe.target.repo})
    return {"include": include}


def format_matrix(matrix: dict[str, list[dict[str, str]]]) -> str:
    """One compact line: what a step writes to ``$GITHUB_OUTPUT``, and what the workflow compares to no change."""
    return json.dumps(matrix, separators=(",", ":"))
