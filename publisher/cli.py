"""Command line: ``publisher validate|plan|publish|push|card|cache|synthesize|changed-recipes|bench-device``.

User mistakes end as one line on stderr and a documented exit code (2 recipe, 3 parity, 4 Hub),
never as a traceback. Each command imports what it runs inside its own function: torch and coremltools
take seconds to import, and ``validate``, ``changed-recipes`` or a bad recipe need neither.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import get_args

from publisher import __version__
from publisher.cache import STAGES
from publisher.device_results import ComputeUnit
from publisher.errors import PublisherError, RecipeError


def one_line(error: Exception) -> str:
    """Messages from libraries sometimes span lines; a CI log reads best with one line per error."""
    return " ".join(str(error).split())


def _validate(args: argparse.Namespace) -> int:
    from publisher.validate import validate_recipe

    failed = 0
    for path in args.recipes:
        try:
            validate_recipe(path)
        except PublisherError as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            failed += 1
        else:
            if not args.quiet:
                print(f"ok: {path}")
    return 2 if failed else 0


def _plan(args: argparse.Namespace) -> int:
    from publisher.plan import describe_plan

    print(describe_plan(args.recipe))
    return 0


def _push_options(args: argparse.Namespace):
    from publisher.push import PushOptions

    return PushOptions(revision=args.revision, create_pr=args.create_pr, dry_run=args.dry_run)


def _publish(args: argparse.Namespace) -> int:
    from publisher.validate import validate_recipe

    # Before importing the pipeline: coremltools alone takes seconds to import, a bad recipe none.
    validate_recipe(args.recipe)
    from publisher.cache import StageCache
    from publisher.pipeline import publish

    push = _push_options(args) if (args.push or args.dry_run) else None
    cache = StageCache(force=frozenset([args.force]) if args.force else frozenset())
    publish(Path(args.recipe), Path(args.out), quiet=args.quiet, push=push, cache=cache)
    return 0


def _cache(args: argparse.Namespace) -> int:
    from publisher.cache import StageCache

    cache = StageCache()
    if args.action == "ls":
        entries = cache.entries()
        for entry in entries:
            made_by = f"  (recipe {entry.recipe})" if entry.recipe else ""
            broken = f"  BROKEN: {entry.problem}; the next run recomputes it" if entry.problem else ""
            print(f"{entry.stage:<9} {entry.key}  {entry.size / 2**20:9.1f} MiB  {entry.label}{made_by}{broken}")
        print(f"{len(entries)} entries, {sum(e.size for e in entries) / 2**20:.1f} MiB in {cache.root}")
    else:
        removed, freed = cache.prune(older_than_days=args.older_than)
        print(f"removed {removed} entries, {freed / 2**20:.1f} MiB freed from {cache.root}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from publisher.push import push_folder_and_report
    from publisher.recipe import check_repo_id

    try:
        check_repo_id(args.repo)
    except ValueError as error:
        raise RecipeError(f"--repo: {error}") from None

    push_folder_and_report(Path(args.folder), args.repo, private=args.private, options=_push_options(args),
                           quiet=args.quiet)
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


def _changed_recipes(args: argparse.Namespace) -> int:
    from publisher.recipe_matrix import changed_recipes, format_matrix, recipe_matrix

    if args.recipe:
        recipes = args.recipe
    elif args.base and args.head:
        recipes = changed_recipes(args.base, args.head)
    else:
        raise RecipeError("changed-recipes: give the BASE and HEAD commits, or --recipe RECIPE")
    print(format_matrix(recipe_matrix(recipes)))
    return 0


def _bench_device(args: argparse.Namespace) -> int:
    from publisher.device_bench import BenchSettings, coreml_tools, run_bench_device
    from publisher.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    settings = BenchSettings(steps=args.steps, runs=args.runs, prompt_tokens=args.prompt_tokens,
                             compute_units=tuple(args.compute_units or ()))
    push = _push_options(args) if (args.push or args.dry_run) else None
    out = Path(args.out) if args.out else None
    run_bench_device(args.target, recipe, coreml_tools(recipe), settings, out=out, push=push, quiet=args.quiet)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def _quiet_libraries() -> None:
    """coremltools, torch and transformers narrate every conversion; keep CI logs to our lines."""
    # tqdm reads this when it is imported, so it must be set before coremltools loads it.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    for name in ("coremltools", "torch", "transformers", "diffusers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _add_push_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of writing the branch")
    parser.add_argument("--dry-run", action="store_true", help="print the Hub operations without writing anything")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="publisher",
        description="Convert, compress, verify and publish Stable Diffusion as Core ML repositories.",
    )
    parser.add_argument("--version", action="version", version=f"coreml-publisher {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="print only errors and final results")
    # Only the commands that convert or run models have library progress to show.
    narrated = argparse.ArgumentParser(add_help=False, parents=[common])
    narrated.add_argument("--verbose", action="store_true", help="also show coremltools' own progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", parents=[common], help="check recipes without converting anything")
    validate.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe files (YAML) to check")
    validate.set_defaults(run=_validate)

    plan = commands.add_parser("plan", parents=[common], help="show what a recipe will build, and its sizes")
    plan.add_argument("recipe", metavar="RECIPE", help="the recipe file (YAML)")
    plan.set_defaults(run=_plan)

    publish = commands.add_parser("publish", parents=[narrated], help="run a recipe and assemble the repository")
    publish.add_argument("recipe", metavar="RECIPE", help="the recipe file (YAML)")
    publish.add_argument("--out", required=True, metavar="DIR", help="where the assembled repository goes")
    publish.add_argument("--push", action="store_true", help="then upload DIR to the recipe's target repo")
    publish.add_argument("--force", nargs="?", const="all", choices=("all", *STAGES), metavar="STAGE",
                         help=f"recompute STAGE ({', '.join(STAGES)}) or every stage instead of using the cache")
    _add_push_flags(publish)
    publish.set_defaults(run=_publish)

    push = commands.add_parser("push", parents=[common], help="upload an assembled folder in one atomic commit")
    push.add_argument("folder", metavar="DIR", help="a folder assembled by `publisher publish`")
    push.add_argument("--repo", required=True, metavar="ID", help="target Hub repo id (namespace/name)")
    push.add_argument("--private", action="store_true", help="create the repo private if it does not exist")
    _add_push_flags(push)
    push.set_defaults(run=_push)

    cache = commands.add_parser("cache", parents=[common], help="list or prune the stage cache")
    cache.add_argument("action", choices=("ls", "prune"),
                       help="ls: list the entries; prune: delete them (all, or those older than --older-than)")
    cache.add_argument("--older-than", type=float, metavar="DAYS", help="prune only entries older than DAYS")
    cache.set_defaults(run=_cache)

    card = commands.add_parser("card", parents=[common], help="re-render README.md of an assembled folder")
    card.add_argument("folder", metavar="DIR", help="a folder assembled by `publisher publish`")
    card.set_defaults(run=_card)

    synthesize = commands.add_parser(
        "synthesize", parents=[common], help="build a random-weight pipeline from a configs folder (offline tests)"
    )
    synthesize.add_argument("configs", metavar="CONFIG_DIR",
                            help="a pipeline's configs without weights, e.g. configs/sd15")
    synthesize.add_argument("out", metavar="OUT_DIR", help="where the pipeline is saved (save_pretrained)")
    synthesize.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    synthesize.set_defaults(run=_synthesize)

    changed = commands.add_parser(
        "changed-recipes", parents=[common], help="print the GitHub Actions matrix of recipes to publish"
    )
    changed.add_argument("base", nargs="?", metavar="BASE", help="commit before the change (all zeros: every recipe)")
    changed.add_argument("head", nargs="?", metavar="HEAD", help="commit after the change, checked out here")
    changed.add_argument("--recipe", action="append", metavar="RECIPE",
                         help="list RECIPE instead of comparing commits (repeatable)")
    changed.set_defaults(run=_changed_recipes)

    bench = commands.add_parser(
        "bench-device", parents=[narrated],
        help="on macOS: Core ML runtime parity, latency and compiled zips for a published repository",
    )
    bench.add_argument("target", metavar="DIR_OR_REPO", help="an assembled folder, or a Hub repo id to download")
    bench.add_argument("--recipe", required=True, metavar="RECIPE",
                       help="the recipe it was published from (parity reference, card template)")
    bench.add_argument("--out", metavar="DIR", help="where a downloaded repo goes (default: bench/<repo name>)")
    bench.add_argument("--steps", type=_positive, default=20,
                       help="diffusion steps per generation, or a language model's decode steps (default 20)")
    bench.add_argument("--prompt-tokens", type=_positive, default=128,
                       help="a language model's prompt length, within what its package takes (default 128)")
    bench.add_argument("--runs", type=_positive, default=5, help="timed generations; the median is kept (default 5)")
    bench.add_argument("--compute-unit", dest="compute_units", action="append", choices=get_args(ComputeUnit),
                       metavar="UNIT", help="time on UNIT (repeatable; default: the one each variant was made for)")
    bench.add_argument("--push", action="store_true", help="then commit the results to the repository")
    _add_push_flags(bench)
    bench.set_defaults(run=_bench_device)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        _quiet_libraries()
    # The publisher's own notes (a retried Hub request) are not results: -q keeps errors only.
    logging.getLogger("publisher").setLevel(logging.ERROR if args.quiet else logging.NOTSET)
    try:
        return args.run(args)
    except PublisherError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing was published", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `publisher plan ... | head` closed the pipe: the reader has what it wanted. Python would report
        # the failed flush at exit, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
