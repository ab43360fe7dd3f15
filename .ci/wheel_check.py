"""A regular install publishes the demo: build the wheel, install it (not editable) into a fresh venv,
publish a copy of recipes/examples from outside the checkout, and size a Hub recipe from the packaged configs.

Run with the interpreter whose environment holds the dependencies (`.ci/run` runs it after its install).
It takes minutes, most of them the demo's conversion, so it is a step of `.ci/run` and of CI's test job
rather than a pytest test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "tiny-sd-palettized.yaml"
HUB_RECIPE = "stable-diffusion-v1-5.yaml"


def run(command: list[str | Path], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, command)), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def copy_sources(destination: Path) -> None:
    """The files a clean clone would hold (plus uncommitted, not ignored ones): an in-tree build would reuse
    setuptools' build/lib, where a module deleted from publisher/ survives into the wheel."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                 capture_output=True, text=True).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_symlink():  # the configs share folders through links, which the wheel resolves
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            (destination / name).symlink_to(os.readlink(source))
        elif source.is_file():  # a tracked file deleted in the working tree is not part of it
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def check_wheel_contents(wheel: Path, sources: Path) -> None:
    """Every file of the package's source folder is in the wheel (the card templates are package data)."""
    package = sources / "publisher"
    expected = {(Path(folder) / name).relative_to(sources).as_posix()
                for folder, _, names in os.walk(package, followlinks=True) for name in names}
    expected = {name for name in expected if "__pycache__" not in name}
    with zipfile.ZipFile(wheel) as archive:
        missing = expected - set(archive.namelist())
    if missing:
        sys.exit(f"the wheel lacks {sorted(missing)}")


def fresh_venv(folder: Path) -> Path:
    """A venv that sees this environment's packages (`.pth`) but not its editable install of publisher.

    Reinstalling torch, coremltools and the rest would take minutes and test pip, not this package. A `.pth`
    line that is a path adds that folder without running the `.pth` files inside it, so the checkout's
    editable finder stays out.
    """
    run([sys.executable, "-m", "venv", "--without-pip", folder])
    python = folder / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    capture_output=True, text=True).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(deps)))
    return python


def main() -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wheel-check-") as tmp:
        work = Path(tmp)
        sources, dist = work / "src", work / "dist"
        copy_sources(sources)
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", dist, sources])
        [wheel] = dist.glob("*.whl")
        check_wheel_contents(wheel, sources)

        python = fresh_venv(work / "venv")
        # With its dependencies but no index: pip checks that every declared requirement is met here.
        run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--quiet", wheel])

        # Outside the checkout, with nothing pointing into it: only the installed package can answer.
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{python.parent}{os.pathsep}{env['PATH']}"
        env["COREML_PUBLISHER_CACHE"] = str(work / "stage-cache")  # every stage runs from the wheel's code
        imported = run([python, "-c", "import publisher; print(publisher.__file__)"], cwd=work, env=env,
                       capture_output=True, text=True).stdout.strip()
        if not Path(imported).is_relative_to(work / "venv"):
            sys.exit(f"publisher was imported from {imported}, not from the fresh venv")

        examples = Path(shutil.copytree(ROOT / "recipes" / "examples", work / "examples"))
        out = work / "out" / "tiny-sd-palettized"
        run([python.parent / "publisher", "publish", examples / RECIPE, "--out", out, "-q"], cwd=work, env=env)
        card = out / "README.md"
        if not card.is_file() or "tiny-sd-palettized" not in card.read_text():
            sys.exit(f"no model card at {card}")
        # The architecture configs are package data: the installed package sizes a Hub recipe offline.
        hub_recipe = Path(shutil.copy(ROOT / "recipes" / HUB_RECIPE, work / HUB_RECIPE))
        plan = run([python.parent / "publisher", "plan", hub_recipe], cwd=work, env=env, capture_output=True,
                   text=True).stdout
        if " ? " in plan or "stable-diffusion-v1-5" not in plan:
            sys.exit(f"the installed package could not size {HUB_RECIPE} from its configs:\n{plan}")
    print(f"wheel check passed in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
