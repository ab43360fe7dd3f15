"""Loading a full-size SD 1.5-architecture checkpoint from one original-layout file, against the same weights
as a diffusers folder, measured in one run (random weights from configs/sd15; each load in a fresh process).

    python benchmarks/single_file.py

Rows: diffusers' ``from_pretrained`` of the folder (the baseline: what a folder source costs), diffusers'
``from_single_file`` of the checkpoint, and the run's whole ``source`` stage for that file
(``publisher.checkpoint.assemble_source``: the single-file load plus ``save_pretrained`` of the assembled
pipeline, paid once and cached). Both sources hold float16 weights, as released checkpoints do; every load
is in float32, as the parity reference is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.random_sources import ROOT, machine, pipeline  # noqa: E402

CONFIG = ROOT / "configs" / "sd15"
CHECKPOINT = ROOT / "build" / "random" / "sd15-original-fp16.safetensors"

# Each child prints {"seconds", "peak_bytes"}: VmHWM is the process's own peak, from exec on.
MEASURE = """
import json, sys, time, torch
from pathlib import Path
started = time.perf_counter()
{body}
seconds = time.perf_counter() - started
peak = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("VmHWM:"))
print(json.dumps({{"seconds": seconds, "peak_bytes": peak}}))
"""
LOADS = {
    "diffusers folder, from_pretrained (baseline)":
        "from diffusers import StableDiffusionPipeline\n"
        "StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32)",
    "single file, from_single_file":
        "from diffusers import StableDiffusionPipeline\n"
        "StableDiffusionPipeline.from_single_file(sys.argv[2], config=sys.argv[3], local_files_only=True,"
        " torch_dtype=torch.float32)",
    "single file, the source stage (load + save_pretrained)":
        "import tempfile\n"
        "from publisher.checkpoint import assemble_source\n"
        "from publisher.recipe import Source\n"
        "source = Source(path=Path(sys.argv[2]), config=Path(sys.argv[3]))\n"
        "assemble_source(source, Path(tempfile.mkdtemp(dir=sys.argv[4])))",
}


def write_checkpoint(folder: Path) -> None:
    """The folder's weights in the original layout, float16, written once by the tests' inverse key mapping."""
    if CHECKPOINT.is_file():
        return
    code = ("import sys, torch; from pathlib import Path; from diffusers import StableDiffusionPipeline;"
            " from tests.original_layout import original_state_dict, write_checkpoint;"
            " pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32);"
            " write_checkpoint(original_state_dict(pipe, 'sd1'), Path(sys.argv[2]), dtype=torch.float16)")
    subprocess.run([sys.executable, "-c", code, str(folder), str(CHECKPOINT)], check=True, cwd=ROOT)


def main() -> None:
    folder = pipeline(CONFIG)
    fp16_folder = folder.parent / "sd15-fp16"
    if not (fp16_folder / "model_index.json").is_file():
        subprocess.run([sys.executable, "-c",
                        "import sys, torch; from diffusers import StableDiffusionPipeline;"
                        " StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float16)"
                        ".save_pretrained(sys.argv[2])", str(folder), str(fp16_folder)], check=True)
    write_checkpoint(folder)
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "build") as scratch:
        for name, body in LOADS.items():
            result = subprocess.run(
                [sys.executable, "-c", MEASURE.format(body=body), str(fp16_folder), str(CHECKPOINT), str(CONFIG),
                 scratch], check=True, capture_output=True, text=True, cwd=ROOT)
            rows.append((name, json.loads(result.stdout.strip().splitlines()[-1])))
    base = rows[0][1]
    print(f"machine: {machine()}")
    print(f"checkpoint: {CHECKPOINT.stat().st_size / 2**30:.2f} GiB (fp16, original layout)\n")
    print("| load | seconds | x baseline | peak GiB | x baseline |")
    print("|---|---|---|---|---|")
    for name, measured in rows:
        print(f"| {name} | {measured['seconds']:.1f} | {measured['seconds'] / base['seconds']:.2f} |"
              f" {measured['peak_bytes'] / 2**30:.2f} | {measured['peak_bytes'] / base['peak_bytes']:.2f} |")


if __name__ == "__main__":
    main()
