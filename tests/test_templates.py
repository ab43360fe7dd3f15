"""A recipe's card template is untrusted: it stays inside the recipe's folder, renders sandboxed, and a
broken one is refused at `validate`, before any work.

In the publish workflow a merged recipe runs next to `HF_TOKEN`, so each door a template could open to
the process (a path outside the folder, a symlink, Python internals reached from jinja2's globals) is
tried here, and the push that would have published it is shown to reach nothing on the loopback Hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from publisher.cli import main
from tests.conftest import TINY_SOURCE
from tests.hub.server import TokenInfo

pytest_plugins = ["tests.hub.fixtures"]

SENTINEL = "hf_SENTINELtemplateSECRET5g6h7j8k"
NAMESPACE = "coreml-publisher"

RECIPE = f"""\
name: hostile
source:
  path: {TINY_SOURCE}
target:
  repo: {NAMESPACE}/hostile
conversion:
  components: [text_encoder]
parity:
  image_steps: 0
card:
  template: {{template}}
"""

STOCK_INCLUDE = '{% include "partials/intro.md.j2" %}\n'


def _recipe(folder: Path, template: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(template=template))
    return path


def _validate(recipe: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["validate", "-q", str(recipe)])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("template", ["/proc/self/environ", "/etc/passwd", "../../../../../../proc/self/environ"])
def test_a_template_outside_the_recipe_folder_is_refused(tmp_path: Path, template: str, capsys):
    code, err = _validate(_recipe(tmp_path, template), capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "recipe.yaml:11: card.template:" in err
    assert "must be a file inside the recipe's folder" in err


def test_a_symlink_out_of_the_recipe_folder_is_refused(tmp_path: Path, capsys):
    (tmp_path / "card.md.j2").symlink_to("/etc/passwd")
    (tmp_path / "etc").symlink_to("/etc", target_is_directory=True)
    for template in ("card.md.j2", "etc/passwd"):
        code, err = _validate(_recipe(tmp_path, template), capsys)
        assert code == 2, template
        assert "must be a file inside the recipe's folder" in err


def test_a_template_including_a_file_outside_the_folder_is_refused(tmp_path: Path, capsys):
    (tmp_path / "leak.md.j2").symlink_to("/proc/self/environ")
    (tmp_path / "card.md.j2").write_text(STOCK_INCLUDE + '{% include "leak.md.j2" %}\n')
    code, err = _validate(_recipe(tmp_path, "card.md.j2"), capsys)
    assert code == 2
    assert err.count("\n") == 1
    assert "card.md.j2" in err and "leak.md.j2" in err and "outside" in err


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{{ cycler.__init__.__globals__.os.environ.get('HF_TOKEN') }}", "unsafe"),
        ("{{ joiner.__init__.__globals__['os'].environ }}", "unsafe"),
        ("{{ card.report.__class__.__mro__ }}", "unsafe"),
        ("{{ lipsum.__globals__ }}", "unsafe"),
        # A method of the context's own objects: it would write publish_report.json anywhere.
        ("{{ card.report.write(card.report.recipe_file) }}", "unsafe"),
    ],
)
def test_python_internals_are_out_of_a_template_s_reach(tmp_path: Path, body: str, message: str, capsys,
                                                       monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    (tmp_path / "card.md.j2").write_text(STOCK_INCLUDE + body + "\n")
    code, err = _validate(_recipe(tmp_path, "card.md.j2"), capsys)
    assert code == 2
    assert err.count("\n") == 1
    assert "card.md.j2:2" in err and message in err
    assert SENTINEL not in err


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ("# {{ card.title }}\n\n{{ card.no_such_thing }}\n", 3, "no_such_thing"),
        ("# {{ card.title }}\n{% if card.title %}\nunclosed\n", 3, "syntax"),
        ("{{ missing_variable }}\n", 1, "missing_variable"),
        ('{% include "partials/none.md.j2" %}\n', 1, "partials/none.md.j2"),
    ],
    ids=["undefined-attribute", "syntax-error", "undefined-variable", "missing-include"],
)
def test_a_broken_template_is_refused_at_validate(tmp_path: Path, body: str, line: int, message: str, capsys):
    (tmp_path / "card.md.j2").write_text(body)
    code, err = _validate(_recipe(tmp_path, "card.md.j2"), capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"card.md.j2:{line}:" in err and message in err


def test_a_good_template_next_to_the_recipe_validates(tmp_path: Path, capsys):
    (tmp_path / "partials").mkdir()
    (tmp_path / "partials" / "extra.md.j2").write_text("Made by {{ card.report.recipe_name }}.\n")
    (tmp_path / "card.md.j2").write_text(STOCK_INCLUDE + '{% include "partials/extra.md.j2" %}\n')
    code, err = _validate(_recipe(tmp_path, "card.md.j2"), capsys)
    assert (code, err) == (0, "")


def test_a_hostile_template_publishes_nothing(hub_server, tmp_path: Path, capsys, monkeypatch):
    """The leak as reported: `publish --push` with the token in the environment. It stops at validation:
    nothing is written to --out and the Hub never hears of the repo."""
    hub_server.tokens[SENTINEL] = TokenInfo(NAMESPACE, "write")
    hub_server.namespaces.add(NAMESPACE)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "card.md.j2").write_text("{{ cycler.__init__.__globals__.os.environ.get('HF_TOKEN') }}\n")
    for template in ("card.md.j2", "/proc/self/environ"):
        out = tmp_path / "out"
        code = main(["publish", str(_recipe(recipes, template)), "--out", str(out), "--push", "-q"])
        captured = capsys.readouterr()
        assert code == 2, captured.err
        assert SENTINEL not in captured.out + captured.err
        assert not out.exists()
        assert not [path for path in tmp_path.iterdir() if path.name.startswith(".out")]
    assert hub_server.requests == []
    assert f"{NAMESPACE}/hostile" not in hub_server.storage.repos
