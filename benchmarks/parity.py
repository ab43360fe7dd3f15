"""Executor vs torch eager on the full-size SD 1.5 UNet (random weights, real config).

Needs ~8 GB and ~10 minutes on 2 cores (the conversion is cached under build/). On a shared
machine run it under the heavy-job lock:

    flock /tmp/coreml-publisher-heavy.lock .venv/bin/python benchmarks/parity.py

Each phase runs in its own subprocess so that its peak RSS is its own. Prints a table: load time,
forward time, peak RSS, and the executor/torch forward ratio (targets: 1.2x in fp32 mode, 1.5x in
fp16 mode; the 6-bit package decompressed in 5 s). `--baseline DIR` measures the executor of
another checkout too (e.g. a copy of the code before a change), in the same run: before and after
rows against the same torch eager time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "parity-bench"
SEED = 0
BATCH = 2
TOKENS = 77


def _unet_config() -> dict:
    # diffusers UNet2DConditionModel defaults are SD 1.x's blocks; these three complete SD 1.5.
    return {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {
        "sample": rng.standard_normal((BATCH, 4, 64, 64)).astype(np.float32),
        "timestep": np.array([999.0, 500.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((BATCH, TOKENS, 768)).astype(np.float32),
    }


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def _unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    return UNet2DConditionModel(**_unet_config()).eval()


class _TensorsOnly(torch.nn.Module):
    """The UNet as a function of tensors only, which is what tracing needs."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def phase_convert(out: Path) -> dict:
    """Trace and convert the UNet to an fp16 ML Program (iOS16), once; cached."""
    import coremltools as ct

    from publisher.coremltools_fixes import install_coremltools_fixes

    install_coremltools_fixes()
    start = time.perf_counter()
    wrapped = _TensorsOnly(_unet()).eval()
    example = tuple(torch.from_numpy(v) for v in _inputs().values())
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, example, strict=False, check_trace=False)
    model = ct.convert(
        traced,
        inputs=[ct.TensorType(name=k, shape=v.shape) for k, v in _inputs().items()],
        outputs=[ct.TensorType(name="noise_pred")],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS16,
        compute_precision=ct.precision.FLOAT16,
    )
    model.save(str(out))
    return {"seconds": time.perf_counter() - start, "rss": _peak_rss_gib()}


def phase_palettize(src: Path, out: Path) -> dict:
    """6-bit palettization (uniform LUT: kmeans would take minutes and changes nothing measured here)."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    start = time.perf_counter()
    model = ct.models.MLModel(str(src), skip_model_load=True)
    config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="uniform", nbits=6))
    cto.palettize_weights(model, config).save(str(out))
    return {"seconds": time.perf_counter() - start, "rss": _peak_rss_gib()}


def phase_torch(repeats: int) -> dict:
    unet = _unet()
    inputs = {k: torch.from_numpy(v) for k, v in _inputs().items()}
    times = []
    with torch.inference_mode():
        reference = unet(**inputs, return_dict=False)[0]
        for _ in range(repeats):
            start = time.perf_counter()
            unet(**inputs, return_dict=False)
            times.append(time.perf_counter() - start)
    np.save(CACHE / "reference.npy", reference.numpy())
    return {"forward": float(np.median(times)), "rss": _peak_rss_gib()}


def phase_executor(package: Path, modes: list[str], repeats: int) -> dict:
    from publisher.executor import load_program, run

    start = time.perf_counter()
    program = load_program(package)
    result: dict = {
        "load": time.perf_counter() - start,
        "read": program.load_seconds,
        "decompress": program.decompress_seconds,
    }
    reference = np.load(CACHE / "reference.npy")
    for mode in modes:
        # Untimed, as torch's reference forward is: the first forward faults its activations in.
        run(program, _inputs(), mode=mode)
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            out = run(program, _inputs(), mode=mode)["noise_pred"]
            times.append(time.perf_counter() - begin)
        rmse = float(np.sqrt(np.mean((reference.astype(np.float64) - out) ** 2)))
        result[mode] = {
            "forward": float(np.median(times)),
            "psnr": float(20 * np.log10((np.abs(reference).max() + 1e-5) / (rmse + 1e-10))),
        }
    result["rss"] = _peak_rss_gib()
    return result


def _subprocess(*args: str, code: Path | None = None) -> dict:
    """Run one phase in its own process; `code`: a checkout whose `publisher` package it imports."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, __file__, "--phase", *args], check=True, capture_output=True, text=True, cwd=ROOT, env=env
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _median(results: list[dict], *keys: str) -> float:
    values = []
    for result in results:
        for key in keys:
            result = result[key]
        values.append(result)
    return float(np.median(values))


def _row(name: str, results: list[dict], mode: str, eager: float) -> tuple:
    forward = _median(results, mode, "forward")
    return (
        name,
        f"{_median(results, 'load'):.1f}",
        forward,
        max(r["rss"] for r in results),
        f"{forward / eager:.2f}x",
        f"{results[0][mode]['psnr']:.1f}",
    )


def _measure(args: argparse.Namespace, fp16: Path, six_bit: Path | None) -> list[tuple]:
    """Rows of the table. Each round runs every phase once, one after the other, so that a load
    that comes and goes on a shared machine weighs on all of them alike; medians over rounds."""
    repeats = str(args.repeats)
    checkouts = ([(" (baseline)", args.baseline)] if args.baseline is not None else []) + [("", None)]
    eager_runs: list[dict] = []
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        eager_runs.append(_subprocess("torch", repeats))
        for label, code in checkouts:
            runs.setdefault((label, "fp16"), []).append(
                _subprocess("executor", str(fp16), repeats, *args.modes, code=code)
            )
            if six_bit is not None:
                runs.setdefault((label, "6-bit"), []).append(
                    _subprocess("executor", str(six_bit), repeats, "fp32", code=code)
                )
    eager = _median(eager_runs, "forward")
    rows = [("torch eager (fp32 weights)", "-", eager, max(r["rss"] for r in eager_runs), "-", "-")]
    for label, _ in checkouts:
        rows += [
            _row(f"executor{label} fp16 package, {mode} mode", runs[(label, "fp16")], mode, eager)
            for mode in args.modes
        ]
        if six_bit is not None:
            pal = runs[(label, "6-bit")]
            name = f"executor{label} 6-bit package, fp32 mode (decompress {_median(pal, 'decompress'):.1f} s)"
            rows.append(_row(name, pal, "fp32", eager))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per measurement (median)")
    parser.add_argument("--skip-palettized", action="store_true", help="do not measure the 6-bit UNet")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of other executor code (its root) to measure too, in the same run: before/after rows",
    )
    parser.add_argument("--rounds", type=int, default=1, help="times every phase runs, interleaved (median)")
    parser.add_argument(
        "--modes", nargs="+", choices=("fp32", "fp16"), default=["fp32", "fp16"], help="executor modes to time"
    )
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        _quiet()
        name, *rest = args.phase
        if name == "convert":
            result = phase_convert(Path(rest[0]))
        elif name == "palettize":
            result = phase_palettize(Path(rest[0]), Path(rest[1]))
        elif name == "torch":
            result = phase_torch(int(rest[0]))
        else:
            result = phase_executor(Path(rest[0]), rest[2:], int(rest[1]))
        print(json.dumps(result))
        return

    CACHE.mkdir(parents=True, exist_ok=True)
    fp16 = CACHE / "unet_sd15_fp16.mlpackage"
    six_bit = CACHE / "unet_sd15_6bit.mlpackage"
    if not fp16.exists():
        converted = _subprocess("convert", str(fp16))
        print(f"converted fp16 UNet in {converted['seconds']:.0f} s (peak {converted['rss']:.1f} GiB)")
    if not args.skip_palettized and not six_bit.exists():
        palettized = _subprocess("palettize", str(fp16), str(six_bit))
        print(f"palettized 6-bit in {palettized['seconds']:.0f} s (peak {palettized['rss']:.1f} GiB)")
    rows = _measure(args, fp16, None if args.skip_palettized else six_bit)
    print(
        f"\nSD 1.5 UNet, random weights, latents 2x4x64x64, 77 tokens; median of {args.repeats} forwards"
        f" per process, median over {args.rounds} rounds"
    )
    print("| run | load (s) | forward (s) | peak RSS (GiB) | executor / torch | PSNR vs torch (dB) |")
    print("|---|---|---|---|---|---|")
    for name, load, forward, rss, ratio, psnr in rows:
        print(f"| {name} | {load} | {forward:.2f} | {rss:.1f} | {ratio} | {psnr} |")


if __name__ == "__main__":
    main()
