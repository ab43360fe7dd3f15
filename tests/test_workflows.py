"""The GitHub Actions workflows and the code they run (`publisher.recipe_matrix`, `publisher.device_bench`),
checked on Linux.

The workflow files are validated against GitHub's schema. Every step that runs `publisher` is executed by
bash as GitHub would, with a recording stand-in for `publisher`, and each recorded command line goes
through the real CLI parser. The publish job's steps then run for real against the loopback Hub, and the
macOS job runs with fake Core ML tools (a compiler, a predictor and a clock).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from publisher.cli import build_parser, main
from publisher.device_bench import (
    BenchSettings,
    DeviceTools,
    bench_device,
    compile_variant,
    fetch_published,
    push_results,
    run_bench_device,
    zip_compiled,
)
from publisher.device_results import DeviceResults, DeviceRun, read_device_results
from publisher.errors import HubError, ParityError, PublisherError, RecipeError
from publisher.hub import push_folder
from publisher.layout import DEVICE_RESULTS_NAME
from publisher.parity import coreml_runtime_available
from publisher.push import PushOptions
from publisher.recipe import load_recipe
from publisher.recipe_matrix import ZERO_SHA, changed_recipes, format_matrix, recipe_matrix
from publisher.report import PublishReport
from tests.conftest import DEMO_RECIPE, ROOT
from tests.hub.helpers import USER, WRITE_TOKEN, make_published_folder, sha256_of
from tests.hub.server import HubServer, TokenInfo

pytest_plugins = ["tests.hub.fixtures"]

WORKFLOWS = ROOT / ".github" / "workflows"
BIN = Path(sys.executable).parent
DEMO = DEMO_RECIPE.relative_to(ROOT).as_posix()
DEMO_REPO = "coreml-publisher/tiny-sd-palettized"
DEMO_MATRIX = {"recipe": DEMO, "name": "tiny-sd-palettized", "repo": DEMO_REPO}
PUBLISHER_TOKEN = "hf_SENTINELpublisherTOKEN7h8j9k"
BASE_SHA, HEAD_SHA = "1" * 40, "2" * 40
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
PUBLISHER_COMMAND = re.compile(r"(^|\$\()\s*publisher\s", re.MULTILINE)  # `publisher` as a command


# ---------------------------------------------------------------------------------------------
# Running workflow steps as GitHub does


def load_workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def github_context(event: str, *, push: bool | None = None, create_pr: bool | None = None,
                   matrix: dict | None = None, workspace: Path = ROOT) -> dict:
    """The expression contexts of one run; inputs are empty outside a dispatch, as on GitHub."""
    dispatched = event == "workflow_dispatch"
    return {
        "github": {"event_name": event, "sha": HEAD_SHA, "event": {"before": BASE_SHA}, "workspace": str(workspace)},
        "inputs": {"recipe": DEMO if dispatched else None, "push": push, "create_pr": create_pr},
        "matrix": matrix or DEMO_MATRIX,
        "secrets": {"HF_TOKEN": PUBLISHER_TOKEN},
    }


def resolve(value: str, context: dict) -> str:
    """Substitute `${{ a.b.c }}` context paths the way GitHub renders them into strings."""
    def lookup(match: re.Match) -> str:
        node = context
        for part in match.group(1).split("."):
            assert isinstance(node, dict) and part in node, f"unknown or non-path expression {match.group(0)}"
            node = node[part]
        return "" if node is None else str(node).lower() if isinstance(node, bool) else str(node)

    return EXPRESSION.sub(lookup, value)


def publisher_steps(workflow: dict) -> list[tuple[str, dict, dict]]:
    """(job id, job, step) of every step whose script runs `publisher`."""
    return [(job_id, job, step) for job_id, job in workflow["jobs"].items() for step in job["steps"]
            if PUBLISHER_COMMAND.search(step.get("run", ""))]


def run_step(workflow: dict, job: dict, step: dict, context: dict, cwd: Path, path: Path,
             output: Path) -> subprocess.CompletedProcess:
    assert "${{" not in step["run"], f"step {step.get('name')!r}: pass expressions through env, not the script"
    env = {**os.environ, "PATH": f"{path}{os.pathsep}{os.environ['PATH']}", "GITHUB_OUTPUT": str(output)}
    for scope in (workflow, job, step):
        env.update({key: resolve(str(value), context) for key, value in scope.get("env", {}).items()})
    # `shell: bash` on GitHub runs `bash --noprofile --norc -eo pipefail {0}`.
    assert workflow["defaults"]["run"]["shell"] == "bash"
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def recording_publisher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A `publisher` that only records its arguments (and prints an empty matrix); returns (bin dir, log)."""
    bin_dir, log = tmp_path / "shim", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    shim = bin_dir / "publisher"
    shim.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['PUBLISHER_CALLS'], 'a') as log:\n"
        "    log.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if sys.argv[1:2] == ['changed-recipes']:\n"
        "    print('{\"include\":[]}')\n"
    )
    shim.chmod(0o755)
    monkeypatch.setenv("PUBLISHER_CALLS", str(log))
    return bin_dir, log


# ---------------------------------------------------------------------------------------------
# The workflow files


def test_workflows_validate_against_githubs_schema(tmp_path: Path):
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert [file.name for file in files] == ["ci.yml", "publish.yml"]
    command = [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows"]
    checked = subprocess.run([*command, *map(str, files)], capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # The validator does reject a broken workflow: a job without `runs-on`.
    broken = load_workflow("publish.yml")
    del broken["jobs"]["publish"]["runs-on"]
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    rejected = subprocess.run([*command, str(tmp_path / "broken.yml")], capture_output=True, text=True, timeout=120)
    assert rejected.returncode == 1 and "runs-on" in rejected.stdout + rejected.stderr


USES = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<action>[^@\s]+)@(?P<ref>\S+)(?P<comment>.*)$")
COMMIT, VERSION_COMMENT = re.compile(r"[0-9a-f]{40}"), re.compile(r" # v\d+\.\d+\.\d+")


def pin_problems(files: list[Path]) -> list[str]:
    """Each `uses:` not pinned to a full commit sha with its version in a comment, or pinned two ways."""
    problems, pins = [], {}
    for file in files:
        text = file.read_text()
        steps = [step["uses"] for job in yaml.safe_load(text)["jobs"].values() for step in job["steps"]
                 if "uses" in step]
        found = [match for match in map(USES.match, text.splitlines()) if match]
        if [f"{match['action']}@{match['ref']}" for match in found] != steps:
            problems.append(f"{file.name}: a `uses:` is written in a form this check does not read")
        for match in found:
            if not (COMMIT.fullmatch(match["ref"]) and VERSION_COMMENT.fullmatch(match["comment"])):
                problems.append(f"{file.name}: {match.group().strip()}")
            # actions/cache/restore and actions/cache/save come from one repository, so from one pin.
            pins.setdefault("/".join(match["action"].split("/")[:2]), set()).add(match["ref"] + match["comment"])
    problems += [f"{repo} is pinned as {sorted(refs)}" for repo, refs in pins.items() if len(refs) > 1]
    return problems


def test_every_action_is_pinned_to_a_commit_with_its_version():
    # A tag can be moved to other code; a commit cannot. The comment says which release the sha is.
    assert pin_problems(sorted(WORKFLOWS.glob("*.yml"))) == []


def test_no_checkout_leaves_the_token_in_the_clone():
    # No job pushes to git, and the publish jobs hold HF_TOKEN next to code that could read .git/config.
    for name in ("ci.yml", "publish.yml"):
        for job_id, job in load_workflow(name)["jobs"].items():
            for step in job["steps"]:
                if step.get("uses", "").startswith("actions/checkout@"):
                    assert step.get("with", {}).get("persist-credentials") is False, f"{name}: {job_id}"


def lint_workflows(workflows: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """CI's `Lint workflows` step, run by bash as GitHub would, in a checkout holding ``workflows``."""
    ci = load_workflow("ci.yml")
    [step] = [step for step in ci["jobs"]["lint"]["steps"] if step.get("name") == "Lint workflows"]
    checkout = tmp_path / "checkout"
    (checkout / ".github" / "workflows").mkdir(parents=True)
    for name, text in workflows.items():
        (checkout / ".github" / "workflows" / name).write_text(text)
    return run_step(ci, ci["jobs"]["lint"], step, github_context("push"), checkout, BIN, tmp_path / "output")


def test_workflow_linters_pass_on_the_workflows(tmp_path: Path):
    done = lint_workflows({file.name: file.read_text() for file in WORKFLOWS.glob("*.yml")}, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


LINTED = """\
name: linted
on: push
permissions: {}
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: %s
      - run: %s
"""


@pytest.mark.parametrize(("checkout", "script", "expected"), [
    # actionlint: an action on a runtime GitHub removed, and (through shellcheck) an unquoted expansion.
    ("actions/checkout@v4", "echo $1", ['runtime "node20"', "SC2086"]),
    # zizmor: an action by tag, and a checkout that leaves the token in .git/config.
    ("actions/checkout@v7", 'echo "$1"', ["unpinned-uses", "artipacked"]),
])
def test_workflow_linters_reject_what_they_must(checkout: str, script: str, expected: list[str], tmp_path: Path):
    done = lint_workflows({"linted.yml": LINTED % (checkout, script)}, tmp_path)
    assert done.returncode != 0
    assert all(finding in done.stdout + done.stderr for finding in expected), done.stdout + done.stderr


def parse(argv: list[str]):
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"the workflow runs `publisher {' '.join(argv)}`, which the CLI rejects")


SCENARIOS = {
    "push": github_context("push"),
    "dispatch": github_context("workflow_dispatch", push=True, create_pr=False),
    "dispatch-dry-run": github_context("workflow_dispatch", push=False, create_pr=False),
    "dispatch-pr": github_context("workflow_dispatch", push=True, create_pr=True),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_publisher_command_the_workflows_run_parses(scenario: str, recording_publisher: tuple[Path, Path],
                                                          tmp_path: Path):
    shim, log = recording_publisher
    for name in ("ci.yml", "publish.yml"):
        workflow = load_workflow(name)
        for _, job, step in publisher_steps(workflow):
            done = run_step(workflow, job, step, SCENARIOS[scenario], ROOT, shim, tmp_path / "output")
            assert done.returncode == 0, f"{name}: {step.get('name')}: {done.stderr}"
    calls = {argv[0]: argv for argv in map(json.loads, log.read_text().splitlines())}
    assert set(calls) == {"validate", "changed-recipes", "publish", "bench-device"}
    args = {command: parse(argv) for command, argv in calls.items()}

    recipes = sorted(path.relative_to(ROOT).as_posix() for path in ROOT.glob("recipes/**/*.yaml"))
    assert len(recipes) > 1 and sorted(args["validate"].recipes) == recipes
    if scenario == "push":
        assert (args["changed-recipes"].base, args["changed-recipes"].head) == (BASE_SHA, HEAD_SHA)
    else:
        assert args["changed-recipes"].recipe == [DEMO]
    publish = args["publish"]
    assert (publish.recipe, publish.out) == (DEMO, "out/tiny-sd-palettized")
    assert (publish.push, publish.dry_run, publish.create_pr) == {
        "push": (True, False, False),
        "dispatch": (True, False, False),
        "dispatch-dry-run": (False, True, False),
        "dispatch-pr": (True, False, True),
    }[scenario]
    bench = args["bench-device"]
    assert (bench.target, bench.recipe, bench.push) == (DEMO_REPO, DEMO, True)
    assert bench.out == "bench/tiny-sd-palettized"


def test_publish_jobs_share_the_matrix_and_key_concurrency_by_repo():
    jobs = load_workflow("publish.yml")["jobs"]
    assert jobs["changes"]["steps"][0]["with"]["fetch-depth"] == 0
    # The publish job is skipped on exactly what changed-recipes prints when nothing changed.
    assert jobs["publish"]["if"] == f"needs.changes.outputs.matrix != '{format_matrix({'include': []})}'"
    for name, runner in (("publish", "ubuntu-latest"), ("device", "macos-14")):
        job = jobs[name]
        assert job["runs-on"] == runner
        assert job["strategy"]["matrix"] == "${{ fromJSON(needs.changes.outputs.matrix) }}"
        assert job["concurrency"] == {"group": f"{name}-${{{{ matrix.repo }}}}", "cancel-in-progress": False}
    assert jobs["device"]["needs"] == ["changes", "publish"]
    triggers = load_workflow("publish.yml")[True]  # YAML 1.1 reads the key `on` as true
    assert triggers["push"] == {"branches": ["main"], "paths": ["recipes/**"]}
    assert set(triggers["workflow_dispatch"]["inputs"]) == {"recipe", "push", "create_pr"}


def test_publish_job_keeps_its_stage_cache_across_runs():
    """Restored before the publish and saved after it, also when the job failed or was cancelled."""
    job = load_workflow("publish.yml")["jobs"]["publish"]
    steps = {step.get("name"): index for index, step in enumerate(job["steps"])}
    restore, save = job["steps"][steps["Restore the stage cache"]], job["steps"][steps["Save the stage cache"]]
    assert steps["Restore the stage cache"] < steps["Publish"] < steps["Save the stage cache"]
    assert restore["uses"].startswith("actions/cache/restore@") and save["uses"].startswith("actions/cache/save@")
    assert "COREML_PUBLISHER_CACHE" in job["env"]
    assert restore["with"]["path"] == save["with"]["path"] == "${{ env.COREML_PUBLISHER_CACHE }}"
    # Only always() runs a step after a cancellation, and a cancelled job is the one to resume.
    assert save["if"].startswith("always()")
    # Cache keys are immutable: each attempt saves under its own key, and a rerun restores the newest by prefix.
    key = restore["with"]["key"]
    assert key.endswith("-${{ github.run_id }}-${{ github.run_attempt }}")
    assert save["with"]["key"] == f"${{{{ steps.{restore['id']}.outputs.cache-primary-key }}}}"
    prefixes = restore["with"]["restore-keys"].splitlines()
    assert prefixes and all(key.startswith(prefix) for prefix in prefixes)


# ---------------------------------------------------------------------------------------------
# changed-recipes


def git(repo: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=ci", "-c", "user.email=ci@example.com", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


HUB_RECIPE = f"name: hub-model\nsource: {{repo: org/model, revision: {'a' * 40}}}\ntarget: {{repo: me/hub-model}}\n"
LOCAL_RECIPE = "name: local-model\nsource: {path: local-src}\ntarget: {repo: me/local-model}\n"


@pytest.fixture
def recipes_repo(tmp_path: Path) -> tuple[Path, list[str]]:
    """A git repository whose history changes a Hub recipe, a local source, then only other files."""
    repo = tmp_path / "repo"
    (repo / "recipes" / "local-src" / "unet").mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / "recipes" / "hub.yaml").write_text(HUB_RECIPE)
    (repo / "recipes" / "local.yaml").write_text(LOCAL_RECIPE)
    (repo / "recipes" / "local-src" / "model_index.json").write_text("{}")
    (repo / "recipes" / "local-src" / "unet" / "config.json").write_text("{}")
    (repo / "recipes" / "README.md").write_text("recipes\n")
    commits = [commit_all(repo, "recipes")]
    (repo / "recipes" / "hub.yaml").write_text(HUB_RECIPE + "# a comment\n")
    commits.append(commit_all(repo, "edit the hub recipe"))
    (repo / "recipes" / "local-src" / "unet" / "config.json").write_text('{"sample_size": 8}')
    commits.append(commit_all(repo, "edit the local source"))
    (repo / "recipes" / "local-src" / "unet" / "config.json").unlink()
    commits.append(commit_all(repo, "delete a file of the local source"))
    (repo / "recipes" / "README.md").write_text("recipes, documented\n")
    (repo / "recipes" / "hub.yaml").unlink()
    (repo / "recipes" / "new.yml").write_text(HUB_RECIPE.replace("hub-model", "new-model"))
    commits.append(commit_all(repo, "docs, a deleted and a new recipe"))
    return repo, commits


def test_changed_recipes_follows_recipe_files_and_their_local_sources(recipes_repo: tuple[Path, list[str]]):
    repo, commits = recipes_repo
    head = commits[-1]
    git(repo, "checkout", "-q", commits[1])
    assert changed_recipes(commits[0], commits[1], repo) == ["recipes/hub.yaml"]
    git(repo, "checkout", "-q", commits[2])
    assert changed_recipes(commits[1], commits[2], repo) == ["recipes/local.yaml"]
    git(repo, "checkout", "-q", commits[3])
    assert changed_recipes(commits[2], commits[3], repo) == ["recipes/local.yaml"]
    git(repo, "checkout", "-q", head)
    assert changed_recipes(commits[3], head, repo) == ["recipes/new.yml"]
    assert changed_recipes(commits[0], head, repo) == ["recipes/local.yaml", "recipes/new.yml"]
    assert changed_recipes(ZERO_SHA, head, repo) == ["recipes/local.yaml", "recipes/new.yml"]
    assert recipe_matrix(["recipes/new.yml"], repo) == {
        "include": [{"recipe": "recipes/new.yml", "name": "new-model", "repo": "me/new-model"}]
    }


def test_changed_recipes_refuses_a_head_not_checked_out_and_an_unknown_base(recipes_repo: tuple[Path, list[str]]):
    repo, commits = recipes_repo
    git(repo, "checkout", "-q", commits[1])
    with pytest.raises(PublisherError, match="checked out, not"):
        changed_recipes(commits[0], commits[2], repo)
    with pytest.raises(PublisherError, match="is not a commit of the git repository"):
        changed_recipes("f" * 40, commits[1], repo)


def test_cli_changed_recipes_prints_the_matrix(recipes_repo: tuple[Path, list[str]], capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch):
    repo, commits = recipes_repo
    git(repo, "checkout", "-q", commits[1])
    monkeypatch.chdir(repo)
    assert main(["changed-recipes", commits[0], commits[1]]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "include": [{"recipe": "recipes/hub.yaml", "name": "hub-model", "repo": "me/hub-model"}]
    }
    assert main(["changed-recipes", "HEAD", "HEAD"]) == 0
    assert capsys.readouterr().out == format_matrix({"include": []}) + "\n"
    assert main(["changed-recipes"]) == 2
    assert capsys.readouterr().err == "error: changed-recipes: give the BASE and HEAD commits, or --recipe RECIPE\n"


# ---------------------------------------------------------------------------------------------
# bench-device with fake Core ML tools


class FakeCoreML:
    """Xcode's compiler and Core ML's runtime as a test sees them: a compiled folder per package, and
    predictions that take a fixed time on a fake clock and record what they were given."""

    COST = {"TextEncoder.mlmodelc": 0.125, "Unet.mlmodelc": 0.5, "VAEDecoder.mlmodelc": 0.25}

    def __init__(self, psnr_db: float = 40.0) -> None:
        self.now = 0.0
        self.psnr_db = psnr_db
        self.calls: dict[tuple[str, str], int] = {}
        self.inputs: dict[str, dict[str, tuple[tuple[int, ...], np.dtype]]] = {}
        self.measured: list[str] = []

    def clock(self) -> float:
        return self.now

    def compile(self, package: Path, out: Path) -> Path:
        compiled = out / f"{package.stem}.mlmodelc"
        (compiled / "weights").mkdir(parents=True)
        shutil.copyfile(package / "Data" / "com.apple.CoreML" / "model.mlmodel", compiled / "coremldata.bin")
        shutil.copyfile(package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin",
                        compiled / "weights" / "weight.bin")
        return compiled

    def load(self, compiled: Path, compute_unit: str):
        assert (compiled / "coremldata.bin").is_file()

        def predict(inputs: dict[str, np.ndarray]) -> dict:
            self.inputs[compiled.name] = {name: (value.shape, value.dtype) for name, value in inputs.items()}
            self.calls[compiled.name, compute_unit] = self.calls.get((compiled.name, compute_unit), 0) + 1
            self.now += self.COST[compiled.name]
            return {}

        return predict

    def measure(self, component: str, chain: tuple[Path, ...]) -> float:
        assert chain and all(package.is_dir() for package in chain)
        self.measured.append(component)
        return self.psnr_db

    def open_session(self, compiled: Path, compute_unit: str):
        raise AssertionError(f"{compiled.name}: a diffusion pipeline has no stateful model to open a session on")

    def measure_tokens(self, package: Path, variant: str):
        raise AssertionError(f"{package.name}: a diffusion pipeline has no language model to measure tokens of")

    def tools(self, device: str = "Apple M1 (VirtualMac2,1)") -> DeviceTools:
        return DeviceTools(compile=self.compile, load=self.load, measure=self.measure, open_session=self.open_session,
                           measure_tokens=self.measure_tokens, device=device, os="macOS 14.6",
                           tool_versions={"coremltools": "9.0", "Xcode": "15.4"})


@pytest.fixture
def published(demo_output: Path, tmp_path: Path) -> Path:
    """A copy of the demo's assembled folder, free to modify."""
    return Path(shutil.copytree(demo_output, tmp_path / "published"))


def test_bench_device_zips_compiled_models_under_apples_names(published: Path):
    fake = FakeCoreML()
    result = bench_device(published, "someone/my-repo", load_recipe(DEMO_RECIPE), fake.tools(),
                          BenchSettings(steps=2, runs=1), clock=fake.clock)

    assert result.zips == [published / "my-repo_original_compiled.zip"]
    with zipfile.ZipFile(result.zips[0]) as archive:
        names = set(archive.namelist())
        top = "my-repo_original_compiled/"
        assert {name.split("/")[0] for name in names} == {top.rstrip("/")}
        assert {name.split("/")[1] for name in names if name.count("/") >= 1} - {""} == {
            "TextEncoder.mlmodelc", "Unet.mlmodelc", "VAEDecoder.mlmodelc", "VAEEncoder.mlmodelc",
            "merges.txt", "vocab.json",
        }
        assert archive.read(f"{top}vocab.json") == (published / "vocab.json").read_bytes()
        unet = "original/packages/Stable_Diffusion_version_tiny-sd-palettized_unet.mlpackage"
        assert archive.read(f"{top}Unet.mlmodelc/weights/weight.bin") == (
            published / unet / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        ).read_bytes()
    assert not list(published.parent.glob(".published.bench-*")), "the work folder is removed"


def test_compiled_variant_names_every_pipeline_model_and_zips_reproducibly(tmp_path: Path):
    folder = tmp_path / "repo"
    folder.mkdir()
    for name in ("merges.txt", "vocab.json"):
        (folder / name).write_text(name)
    packages = {}
    names = {"controlnet": "ControlNet_lllyasviel_control_v11p_sd15_canny"}
    for component in ("text_encoder", "text_encoder_2", "unet", "control_unet_chunk1", "control_unet_chunk2",
                      "vae_decoder", "controlnet"):
        packages[component] = folder / f"{names.get(component, component)}.mlpackage"
        (packages[component] / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
        for name in ("model.mlmodel", "weights/weight.bin"):
            (packages[component] / "Data" / "com.apple.CoreML" / name).write_bytes(component.encode())

    archives = []
    for attempt in ("first", "second"):
        compiled = compile_variant(folder, packages, tmp_path / attempt / "x_split_einsum_compiled",
                                   FakeCoreML().compile)
        # Apple's bundle_resources_for_swift_cli names, which its Swift pipeline loads.
        assert sorted(path.relative_to(compiled).as_posix() for path in compiled.glob("**/*.mlmodelc")) == [
            "ControlledUnetChunk1.mlmodelc", "ControlledUnetChunk2.mlmodelc", "TextEncoder.mlmodelc",
            "TextEncoder2.mlmodelc", "Unet.mlmodelc", "VAEDecoder.mlmodelc",
            "controlnet/LllyasvielControlV11PSd15Canny.mlmodelc",
        ]
        assert {"merges.txt", "vocab.json"} <= {path.name for path in compiled.iterdir()}
        archives.append(zip_compiled(compiled).read_bytes())
    assert archives[0] == archives[1]


def test_bench_device_times_each_configuration_and_records_it(published: Path):
    (published / DEVICE_RESULTS_NAME).write_text(DeviceResults(results=[
        DeviceRun(device="iPhone 15 Pro", os="iOS 17.4", variant="original", compute_unit="CPU_AND_NE",
                  latency_s=9.0, iterations_per_second=2.5, steps=20, date="2024-05-01",
                  tool_versions={"app": "1.0"}),
        DeviceRun(device="Apple M1 (VirtualMac2,1)", os="macOS 14.5", variant="original", compute_unit="ALL",
                  latency_s=99.0, iterations_per_second=0.1, steps=20, date="2024-05-01",
                  tool_versions={"app": "1.0"}),
    ]).model_dump_json())
    fake = FakeCoreML()
    settings = BenchSettings(steps=4, runs=3, compute_units=("ALL", "CPU_AND_NE"))

    result = bench_device(published, DEMO_REPO, load_recipe(DEMO_RECIPE), fake.tools(), settings, clock=fake.clock)

    # Per generation: the text encoder for both prompts of the batch-2 UNet, 4 UNet steps, one decode.
    assert [(run.compute_unit, run.latency_s, run.iterations_per_second) for run in result.runs] == [
        ("ALL", 2 * 0.125 + 4 * 0.5 + 0.25, 4 / (4 * 0.5)),
        ("CPU_AND_NE", 2.5, 2.0),
    ]
    generations = 1 + settings.runs  # a warm-up, then the timed runs
    assert fake.calls[("Unet.mlmodelc", "ALL")] == 4 * generations
    assert fake.calls[("TextEncoder.mlmodelc", "CPU_AND_NE")] == 2 * generations
    # Inputs follow Apple's I/O contract at the demo's sizes, as declared by each package.
    assert fake.inputs == {
        "TextEncoder.mlmodelc": {"input_ids": ((1, 77), np.float32)},
        "Unet.mlmodelc": {"sample": ((2, 4, 32, 32), np.float16), "timestep": ((2,), np.float16),
                          "encoder_hidden_states": ((2, 32, 1, 77), np.float16)},
        "VAEDecoder.mlmodelc": {"z": ((1, 4, 32, 32), np.float16)},
    }

    recorded = read_device_results(published)
    assert [(run.device, run.compute_unit) for run in recorded] == [
        ("iPhone 15 Pro", "CPU_AND_NE"),  # another device: kept
        ("Apple M1 (VirtualMac2,1)", "ALL"),  # this device: the old row replaced
        ("Apple M1 (VirtualMac2,1)", "CPU_AND_NE"),
    ]
    assert recorded[1].latency_s == 2.5 and recorded[1].runs == 3 and recorded[1].os == "macOS 14.6"

    report = PublishReport.read(published)
    runtime = [r for r in report.parity if r.backend == "coreml-runtime"]
    assert sorted(r.component for r in runtime) == sorted(fake.measured) == [
        "text_encoder", "unet", "vae_decoder", "vae_encoder"
    ]
    assert all(r.passed and r.psnr_db == 40.0 for r in runtime)
    assert any(r.backend == "executor-fp32" for r in report.parity), "the Linux rows stay"
    card = (published / "README.md").read_text()
    assert "| Apple M1 (VirtualMac2,1), macOS 14.6 | `CPU_AND_NE` | `original` | 2.5 | 2.00 |" in card
    assert "| iPhone 15 Pro, iOS 17.4 | `CPU_AND_NE` | `original` | 9.0 | 2.50 |" in card
    assert "Core ML runtime (dB)" in card
    assert "have not been measured yet" not in card
    assert "tags:\n- coreml" in card and "- demo" in card  # the recipe's tags survive the re-render


def test_core_ml_parity_below_threshold_is_recorded_then_fails(published: Path):
    fake = FakeCoreML(psnr_db=20.0)
    with pytest.raises(ParityError, match="parity failed on the Core ML runtime") as failure:
        run_bench_device(str(published), load_recipe(DEMO_RECIPE), fake.tools(), BenchSettings(steps=1, runs=1))
    assert failure.value.exit_code == 3
    rows = [r for r in PublishReport.read(published).parity if r.backend == "coreml-runtime"]
    assert rows and not any(r.passed for r in rows)
    assert read_device_results(published), "the timings are still recorded"


def test_bench_device_refuses_another_recipe(published: Path, tmp_path: Path):
    edited = tmp_path / "edited.yaml"
    source = DEMO_RECIPE.parent / "tiny-sd"
    edited.write_text(DEMO_RECIPE.read_text().replace("path: tiny-sd", f"path: {source}") + "# edited\n")
    with pytest.raises(RecipeError, match="is not the recipe"):
        bench_device(published, DEMO_REPO, load_recipe(edited), FakeCoreML().tools())


@pytest.mark.skipif(coreml_runtime_available(), reason="checks the message where Core ML cannot run")
def test_cli_bench_device_explains_that_it_needs_macos(published: Path, capsys: pytest.CaptureFixture):
    assert main(["bench-device", str(published), "--recipe", str(DEMO_RECIPE)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: bench-device needs macOS") and error.count("\n") == 1
    assert not (published / DEVICE_RESULTS_NAME).exists()


# ---------------------------------------------------------------------------------------------
# Against the loopback Hub


@pytest.fixture
def publisher_hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """The loopback Hub with a token that may write to the demo's namespace, exported as the workflows do."""
    hub_server.tokens[PUBLISHER_TOKEN] = TokenInfo(USER, "write", ("coreml-publisher",))
    hub_server.namespaces.add("coreml-publisher")
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", PUBLISHER_TOKEN)
    return hub_server


def test_publish_workflow_dry_run_against_the_loopback_hub(demo_output: Path, publisher_hub: HubServer,
                                                           isolated_cache: Path, tmp_path: Path):
    """The changes and publish jobs' scripts, run with the real `publisher`, then the device job's code."""
    workflow = load_workflow("publish.yml")
    jobs = workflow["jobs"]
    checkout = tmp_path / "checkout"  # recipes from this repository; outputs stay in the test's folder
    checkout.mkdir()
    (checkout / "recipes").symlink_to(ROOT / "recipes")
    context = github_context("workflow_dispatch", push=True, create_pr=False, workspace=checkout)
    # The job's stage cache folder holds what the demo fixture computed, as a restored cache would.
    Path(resolve(jobs["publish"]["env"]["COREML_PUBLISHER_CACHE"], context)).symlink_to(isolated_cache)

    [(_, _, find)] = [(j, job, s) for j, job, s in publisher_steps(workflow) if j == "changes"]
    done = run_step(workflow, jobs["changes"], find, context, checkout, BIN, tmp_path / "changes-output")
    assert done.returncode == 0, done.stderr
    outputs = dict(line.split("=", 1) for line in (tmp_path / "changes-output").read_text().splitlines())
    matrix = json.loads(outputs["matrix"])
    assert matrix == {"include": [DEMO_MATRIX]}

    context["matrix"] = matrix["include"][0]
    [(_, _, publish)] = [(j, job, s) for j, job, s in publisher_steps(workflow) if j == "publish"]
    done = run_step(workflow, jobs["publish"], publish, context, checkout, BIN, tmp_path / "publish-output")
    assert done.returncode == 0, done.stderr
    out = checkout / "out" / "tiny-sd-palettized"
    published = publisher_hub.snapshot(DEMO_REPO)
    assert set(published) - {".gitattributes"} == {
        path.relative_to(out).as_posix() for path in out.rglob("*") if path.is_file()
    }
    assert publisher_hub.commit_count(DEMO_REPO) == 2  # the Hub's initial commit, then the publish
    [upload] = [s for s in jobs["publish"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    artifacts = resolve(upload["with"]["path"], context).split()
    assert artifacts and all((checkout / path).is_file() for path in artifacts)

    fake = FakeCoreML()
    published_head = publisher_hub.head(DEMO_REPO)
    run_bench_device(DEMO_REPO, load_recipe(DEMO_RECIPE), fake.tools(), BenchSettings(steps=2, runs=1),
                     out=tmp_path / "bench", push=PushOptions(), endpoint=publisher_hub.url, quiet=True)

    head = publisher_hub.head(DEMO_REPO)
    assert publisher_hub.storage.commit(head)["parents"] == [published_head]  # exactly one more commit
    after = publisher_hub.snapshot(DEMO_REPO)
    added = set(after) - set(published)
    assert added == {"tiny-sd-palettized_original_compiled.zip", DEVICE_RESULTS_NAME}
    assert after["tiny-sd-palettized_original_compiled.zip"][0] > 0
    changed = {path for path in published if after[path] != published[path]}
    assert changed == {"README.md", "publish_report.json"}
    card = tmp_path / "bench" / "README.md"
    assert "## Device benchmarks" in card.read_text()
    assert after["README.md"] == (card.stat().st_size, sha256_of(card))


def test_bench_device_does_not_push_over_a_repo_that_moved(hub_server: HubServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    repo = f"{USER}/moving"
    push_folder(make_published_folder(tmp_path / "v1"), repo, endpoint=hub_server.url, progress=False)
    folder = tmp_path / "bench"
    fetched = fetch_published(repo, None, folder, endpoint=hub_server.url)
    assert fetched == hub_server.head(repo) and (folder / "README.md").is_file()
    with pytest.raises(PublisherError, match="is not empty"):
        fetch_published(repo, None, folder, endpoint=hub_server.url)

    (tmp_path / "v1" / "notes.txt").write_text("landed meanwhile")
    moved = push_folder(tmp_path / "v1", repo, endpoint=hub_server.url, progress=False).commit_oid
    (folder / DEVICE_RESULTS_NAME).write_text("{}")
    with pytest.raises(HubError, match="moved from .* while bench-device measured it"):
        push_results(folder, repo, fetched, PushOptions(), endpoint=hub_server.url, quiet=True)
    assert hub_server.head(repo) == moved
