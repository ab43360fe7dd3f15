"""The README shows what ships: its demo recipe is the shipped file, word for word."""

from __future__ import annotations

import re

from tests.conftest import DEMO_RECIPE, ROOT


def test_the_readme_demo_recipe_is_the_shipped_one():
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"`recipes/examples/tiny-sd-palettized.yaml`, as shipped:\n\n```yaml\n(.*?)```\n", readme, re.S)
    assert shown is not None
    assert shown.group(1) == DEMO_RECIPE.read_text()
