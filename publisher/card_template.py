"""The card's jinja2 templates, rendered as the untrusted input they are.

A recipe may name its own template, and a merged recipe runs in CI beside ``HF_TOKEN``, so a template
gets jinja2's sandbox (no ``__globals__`` or ``__class__`` walks from ``cycler`` or the context to
``os.environ``), no method of the context's own objects (``report.write(...)`` would write a file), and
a loader that serves only files inside its folders with every symlink resolved (an ``{% include %}``
of a link to ``/proc/self/environ`` is refused). Its failures become one :class:`RecipeError` line
naming the template file and line.
"""

from __future__ import annotations

import datetime
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from publisher.errors import RecipeError

TEMPLATES = Path(__file__).resolve().parent / "templates"

# Values whose own methods a template may call (`.items()`, `.get()`, `.rstrip()`, `.isoformat()`); the
# sandbox already refuses the unsafe ones (`str.format`, mutation).
_PLAIN_TYPES = (str, int, float, bool, dict, list, tuple, datetime.date)


class _ConfinedLoader(jinja2.FileSystemLoader):
    """jinja2's file loader refuses ``..`` in a name but follows symlinks: this one also checks where they lead."""

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        source, filename, uptodate = super().get_source(environment, template)
        real = Path(filename).resolve()
        if not any(real.is_relative_to(Path(folder).resolve()) for folder in self.searchpath):
            raise jinja2.TemplateNotFound(template, f"{template} leads outside the template folders (to {real})")
        return source, filename, uptodate


class _CardSandbox(ImmutableSandboxedEnvironment):
    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if callable(value) and not isinstance(obj, _PLAIN_TYPES):
            return False
        return super().is_safe_attribute(obj, attr, value)


def environment(template_dir: Path, filters: Mapping[str, Callable[..., Any]]) -> jinja2.Environment:
    """A sandboxed environment loading from ``template_dir``, then the stock templates (for their partials)."""
    env = _CardSandbox(
        loader=_ConfinedLoader([template_dir, TEMPLATES]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters.update(filters)
    return env


def render(template: Path, filters: Mapping[str, Callable[..., Any]], **context: Any) -> str:
    """Render ``template`` with ``context``.

    Raises:
        [`~publisher.errors.RecipeError`]:
            One line naming the template file and line, for a syntax error, an undefined name, an unsafe
            access, a missing or escaping include, or any other exception the template raised.
    """
    try:
        return environment(template.parent, filters).get_template(template.name).render(**context)
    except jinja2.TemplateSyntaxError as error:
        where = f"{error.filename or template}:{error.lineno}"
        raise RecipeError(f"{where}: card template syntax error: {error.message}") from None
    except Exception as error:  # a template can raise anything its expressions do; each is the template's fault
        raise RecipeError(f"{_template_frame(error, template)}: card template failed: {_message(error)}") from None


def _template_frame(error: BaseException, template: Path) -> str:
    """``file:line`` of the innermost template frame in the traceback (jinja2 rewrites it to template lines)."""
    folders = (template.parent.resolve(), TEMPLATES)
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if any(Path(frame.filename).resolve().is_relative_to(folder) for folder in folders)]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else str(template)


def _message(error: BaseException) -> str:
    if isinstance(error, jinja2.TemplateNotFound):
        return error.message or f"no template named {error.name}"
    return " ".join(str(error).split()) or type(error).__name__
