"""Publish throughput over loopback: push a ~1 GiB Core ML folder through hf_xet and through LFS, then push
it again unchanged.

The Hub is the test suite's loopback server (`tests/hub/server.py`), run in its own process so that it does
not share the client's GIL, as a real Hub would not. Needs ~3 GB of disk and a few minutes on 2 cores; on a
shared machine run it under the heavy-job lock:

    flock /tmp/coreml-publisher-heavy.lock .venv/bin/python benchmarks/upload.py

Prints a table: first-push seconds and MiB/s, bytes the server received, re-push seconds and bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_benchmarkWRITEtoken"
REPO = "bench/sd15-coreml"
# Shares of the folder, after the fp16 SD 1.5 components: UNet, text encoder, VAE decoder, VAE encoder.
WEIGHTS = {"unet": 0.625, "text_encoder": 0.23, "vae_decoder": 0.093, "vae_encoder": 0.052}
_CHUNK = 16 * 1024 * 1024


def _serve(root: str, conn: Connection) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.hub.server import HubServer, TokenInfo

    with HubServer(Path(root), {TOKEN: TokenInfo("bench")}) as server:
        conn.send(server.url)
        conn.recv()  # any message: stop


def _make_folder(folder: Path, size_mib: int) -> int:
    """Write the repo layout with random (incompressible, undeduplicable) weights; return its size."""
    packages = folder / "original" / "packages"
    for component, share in WEIGHTS.items():
        package = packages / f"Stable_Diffusion_version_bench_{component}.mlpackage"
        weights = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        weights.parent.mkdir(parents=True)
        remaining = int(size_mib * share * 1024 * 1024)
        with weights.open("wb") as f:
            while remaining > 0:
                block = os.urandom(min(_CHUNK, remaining))
                f.write(block)
                remaining -= len(block)
        (package / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(os.urandom(200_000))
        (package / "Manifest.json").write_text('{"fileFormatVersion": "1.0.0", "itemInfoEntries": {}}')
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- coreml\n---\n# bench\n")
    (folder / "vocab.json").write_text("{" + ", ".join(f'"t{i}</w>": {i}' for i in range(49408)) + "}")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"t{i} x\n" for i in range(48894)))
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _run(mode: str, folder: Path, work: Path) -> dict[str, float | int | str]:
    from huggingface_hub import constants

    from publisher.hub import push_folder

    constants.HF_HUB_DISABLE_XET = mode == "lfs"
    parent, child = multiprocessing.Pipe()
    storage = work / f"hub-{mode}"
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(str(storage), child))
    server.start()
    try:
        url = parent.recv()
        start = time.perf_counter()
        first = push_folder(folder, REPO, token=TOKEN, endpoint=url, progress=False)
        pushed = time.perf_counter()
        again = push_folder(folder, REPO, token=TOKEN, endpoint=url, progress=False)
        repushed = time.perf_counter()
        parent.send("stop")
    finally:
        server.join(timeout=60)
        if server.is_alive():
            server.kill()
    if not (first.verified and again.verified and again.up_to_date):
        raise SystemExit(f"{mode}: publish not verified or re-push not up to date")
    push_s = pushed - start
    return {
        "transfer": mode,
        "push_s": push_s,
        "mib_s": first.bytes_uploaded / 2**20 / push_s,
        # LFS objects, or the xorbs and shards hf_xet wrote into the local CAS: what actually crossed over.
        "stored_mib": sum(p.stat().st_size for p in storage.rglob("*") if p.is_file()) / 2**20,
        "repush_s": repushed - pushed,
        "repush_bytes": again.bytes_uploaded,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="total size of the weights (default 1024)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="upload-bench-") as tmp:
        work = Path(tmp)
        # Before huggingface_hub is imported: it reads these once. A private HF_HOME keeps hf_xet's chunk
        # cache from a previous run out of the measurement.
        os.environ["HF_HOME"] = str(work / "hf-home")
        os.environ["HF_XET_CACHE"] = str(work / "hf-home" / "xet")
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ.pop("HF_TOKEN", None)
        folder = work / "folder"
        size = _make_folder(folder, args.size_mib)
        print(f"folder: {size / 2**20:.0f} MiB in {sum(1 for p in folder.rglob('*') if p.is_file())} files")
        rows = [_run(mode, folder, work) for mode in ("xet", "lfs")]
    header = "| transfer | push (s) | MiB/s | server storage (MiB) | re-push (s) | re-push bytes |"
    print(header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
    for row in rows:
        print(
            f"| {row['transfer']} | {row['push_s']:.1f} | {row['mib_s']:.0f} | {row['stored_mib']:.1f} |"
            f" {row['repush_s']:.2f} | {row['repush_bytes']} |"
        )


if __name__ == "__main__":
    main()
