"""Command line: ``publisher validate|plan|publish|push|card``.

User mistakes end as one line on stderr and a documented exit code (2 recipe, 3 parity, 4 Hub),
never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from publisher import __version__
from publisher.errors import PublisherError


def _validate(args: argparse.Namespace) -> int:
    from publisher.recipe import load_recipe
    from publisher.source import inspect_source

    failed = 0
    for path in args.recipes:
        try:
            inspect_source(load_recipe(path))
        except PublisherError as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
        else:
            if not args.quiet:
                print(f"ok: {path}")
    return 2 if failed else 0


def _plan(args: argparse.Namespace) -> int:
    from publisher.plan import describe_plan

    print(describe_plan(args.recipe))
    return 0


def _publish(args: argparse.Namespace) -> int:
    from publisher.pipeline import publish

    publish(Path(args.recipe), Path(args.out), quiet=args.quiet)
    return 0


def _card(args: argparse.Namespace) -> int:
    from publisher.card import rerender_card

    path = rerender_card(Path(args.folder))
    if not args.quiet:
        print(f"wrote {path}")
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    from publisher.synthetic import build_pipeline

    out = build_pipeline(Path(args.configs), Path(args.out), seed=args.seed)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def _quiet_libraries() -> None:
    """coremltools, torch and transformers narrate every conversion; keep CI logs to our lines."""
    import logging
    import warnings

    # tqdm reads this when it is imported, so it must be set before coremltools loads it.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    for name in ("coremltools", "torch", "transformers", "diffusers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="publisher",
        description="Convert, compress, verify and publish Stable Diffusion as Core ML repositories.",
    )
    parser.add_argument("--version", action="version", version=f"coreml-publisher {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="print only errors and final results")
    common.add_argument("--verbose", action="store_true", help="also show coremltools' own progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", parents=[common], help="check recipes without converting anything")
    validate.add_argument("recipes", nargs="+", metavar="RECIPE")
    validate.set_defaults(run=_validate)

    plan = commands.add_parser("plan", parents=[common], help="show what a recipe will build, and its sizes")
    plan.add_argument("recipe", metavar="RECIPE")
    plan.set_defaults(run=_plan)

    publish = commands.add_parser("publish", parents=[common], help="run a recipe and assemble the repository")
    publish.add_argument("recipe", metavar="RECIPE")
    publish.add_argument("--out", required=True, metavar="DIR", help="where the assembled repository goes")
    publish.set_defaults(run=_publish)

    card = commands.add_parser("card", parents=[common], help="re-render README.md of an assembled folder")
    card.add_argument("folder", metavar="DIR")
    card.set_defaults(run=_card)

    synthesize = commands.add_parser(
        "synthesize", parents=[common], help="build a random-weight pipeline from a configs folder (offline tests)"
    )
    synthesize.add_argument("configs", metavar="CONFIG_DIR")
    synthesize.add_argument("out", metavar="OUT_DIR")
    synthesize.add_argument("--seed", type=int, default=0)
    synthesize.set_defaults(run=_synthesize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    try:
        return args.run(args)
    except PublisherError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
