"""Card: render the published folder's README.md from the run's report with jinja2.

Metadata goes through huggingface_hub's ``ModelCardData`` so the YAML header is exactly what the
Hub validates; the body is a template so maintainers can swap it per recipe.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from publisher.assemble import CARD_NAME
from publisher.report import PublishReport

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
DEFAULT_TEMPLATE = TEMPLATES / "model_card.md.j2"
BASE_TAGS = ("coreml", "core-ml", "stable-diffusion", "text-to-image")


def card_data(report: PublishReport, extra_tags: tuple[str, ...] = ()) -> ModelCardData:
    variant_tags = tuple(variant.attention for variant in report.variants)
    tags = list(dict.fromkeys(BASE_TAGS + variant_tags + tuple(extra_tags)))
    base_model = None if report.source.startswith("local:") else report.source
    return ModelCardData(
        license=report.license or "other",
        base_model=base_model,
        pipeline_tag="text-to-image",
        tags=tags,
        # The Hub otherwise labels a converted repo a fine-tune of its base model.
        base_model_relation="quantized" if base_model else None,
    )


def render_card(report: PublishReport, *, template: Path | None = None, extra_tags: tuple[str, ...] = ()) -> str:
    template_path = template or DEFAULT_TEMPLATE
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader([template_path.parent, TEMPLATES]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    body = environment.get_template(template_path.name).render(report=report)
    card = ModelCard(f"---\n{card_data(report, extra_tags).to_yaml()}\n---\n\n{body}")
    return str(card)


def rerender_card(folder: Path) -> Path:
    """Render README.md again from the folder's own report (e.g. after device results arrive)."""
    report = PublishReport.read(folder)
    path = folder / CARD_NAME
    path.write_text(render_card(report, extra_tags=tuple(report.card_tags)), encoding="utf-8")
    return path
