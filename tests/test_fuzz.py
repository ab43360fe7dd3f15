"""Fuzzed recipes: whatever the input, a valid recipe or one line with exit code 2, never a traceback."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from publisher.errors import RecipeError
from publisher.validate import validate_recipe
from tests.conftest import DEMO_RECIPE, ROOT, TINY_SOURCE

DEMO = yaml.safe_load(DEMO_RECIPE.read_text())
DEMO["source"]["path"] = str(DEMO_RECIPE.parent / "tiny-sd")
# A language-model recipe (task: text-generation) whose Hub source validates offline from its shipped config.
LANGUAGE_MODEL = yaml.safe_load((ROOT / "recipes" / "llama-3.2-1b-int4.yaml").read_text())
BASES = (DEMO, LANGUAGE_MODEL)

hostile_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["../../../../etc/passwd", "/etc", "~root", "🦄" * 50, "a" * 5000, "none", "null",
                     "iOS99", "split_einsum", "0" * 40, "org/model", "../tiny-sd", "\x00", "${HOME}",
                     # issue 15's hostile values: root names as folders, repo ids the Hub refuses,
                     # direction overrides, paths to the process's secrets
                     "vocab.json", "README.md", "images", "original\n", "me/bad..name", "me/name.git",
                     "me/x\n", "a\u202eb", "/proc/self/environ", "recipe.yaml", "{{ cycler.__init__ }}"]),
)
hostile_values = st.recursive(hostile_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=8)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


ALL_PATHS = [[path for path in _paths(base) if path] for base in BASES]


@st.composite
def mutated_recipes(draw) -> str:
    index = draw(st.integers(0, len(BASES) - 1))
    recipe = copy.deepcopy(BASES[index])
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ALL_PATHS[index]))
        parent = recipe
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                parent[path[-1]] = draw(hostile_values)
            elif action == "delete" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, dict):
                parent[draw(st.text(min_size=1, max_size=12))] = draw(hostile_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or retyped this path
    text = yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False)
    corruption = draw(st.sampled_from(["none", "none", "truncate", "insert", "tab"]))
    if corruption == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif corruption == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from([":", "- ", "[", "{", "&a", "*a", "!!python/object:os.system", "'"]))
        text += text[at:]
    elif corruption == "tab":
        text = text.replace("  ", "\t", 1)
    return text


def _outside_files() -> set[Path]:
    return {p for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts}


@settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(text=mutated_recipes())
def test_fuzzed_recipe_is_valid_or_one_line_error(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        validate_recipe(path)
    except RecipeError as error:
        message = str(error)
        assert message and "\n" not in message and error.exit_code == 2
        assert message.startswith(str(path)), message
    assert sorted(p.name for p in folder.iterdir()) == ["recipe.yaml"]


def test_fuzz_touches_nothing_in_the_repository(tmp_path):
    before = _outside_files()
    cases = [
        "name: x\nsource: {path: ../../../../../../etc}\ntarget: {repo: a/b}\n",
        "name: x\nsource: {path: /}\ntarget: {repo: a/b}\ncard: {template: /etc/passwd}\n",
        "!!python/object/apply:os.system ['touch pwned']\n",
        "name: &a [*a]\n",
        "\x00\x01\x02",
    ]
    for index, text in enumerate(cases):
        path = tmp_path / f"case{index}.yaml"
        path.write_bytes(text.encode())
        result = subprocess.run([sys.executable, "-m", "publisher", "validate", str(path)],
                                capture_output=True, text=True, cwd=tmp_path, env={**os.environ})
        assert result.returncode == 2, (text, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"case{i}.yaml" for i in range(len(cases))]
    assert _outside_files() == before


SOURCE_FILES = sorted(str(path.relative_to(TINY_SOURCE)) for path in TINY_SOURCE.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def damaged_source(tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the demo pipeline that each example damages one file of, then restores; and its recipe."""
    folder = tmp_path_factory.mktemp("damaged")
    source = Path(shutil.copytree(TINY_SOURCE, folder / "tiny-sd"))
    recipe = copy.deepcopy(DEMO)
    recipe["source"]["path"] = str(source)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return source, folder / "recipe.yaml"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(SOURCE_FILES), damage=st.sampled_from(["delete", "truncate", "overwrite"]), data=st.data())
def test_damaged_source_file_is_valid_or_one_line_error(damaged_source, name, damage, data):
    """Deleting a file the run reads, or truncating a weight or JSON file, is always caught at validate."""
    source, recipe = damaged_source
    path = source / name
    original = path.read_bytes()
    if damage == "delete":
        path.unlink()
        must_fail = name != "README.md"  # the model card only lends its license
    elif damage == "truncate":
        size = data.draw(st.integers(0, len(original) - 1))
        path.write_bytes(original[:size])
        # a JSON object cut before its closing brace never parses; merges.txt and the card are free text
        must_fail = name.endswith(".safetensors") or (name.endswith(".json") and size < len(original.rstrip()))
    else:
        at = data.draw(st.integers(0, len(original) - 1))
        path.write_bytes(original[:at] + data.draw(st.binary(min_size=1, max_size=8)) + original[at + 8:])
        must_fail = False
    try:
        validate_recipe(recipe)
    except RecipeError as error:
        message = str(error)
        assert "\n" not in message and error.exit_code == 2
        assert message.startswith((str(source), str(recipe))), message
    else:
        assert not must_fail, f"{damage} {name} passed validate"
    finally:
        path.write_bytes(original)
