"""Tokens, folders and hashes shared by the Hub tests and their fixtures."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from huggingface_hub import constants

# Sentinel tokens: tests assert they never appear in a message, a log or a file the publisher writes.
WRITE_TOKEN = "hf_SENTINELwriteTOKEN0a1b2c3d4e5f"
READ_TOKEN = "hf_SENTINELreadTOKEN9z8y7x6w5v4u"
OTHER_USER_TOKEN = "hf_SENTINELbobTOKEN1q2w3e4r5t6y"
USER = "alice"
ORG = "coreml-community"

# Small, so that a weight of a few hundred KB already takes the multipart path and the suite stays fast.
MULTIPART_THRESHOLD = 256 * 1024
MULTIPART_CHUNK = 128 * 1024


def set_transfer(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Route uploads and downloads through hf_xet (`"xet"`) or plain LFS (`"lfs"`).

    huggingface_hub reads HF_HUB_DISABLE_XET once, into `constants`, at import; its upload and download code
    consults `constants.HF_HUB_DISABLE_XET` at call time, so patching the constant switches the path.
    """
    if mode not in ("xet", "lfs"):
        raise ValueError(mode)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1" if mode == "lfs" else "0")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", mode == "lfs")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def folder_state(folder: Path) -> dict[str, tuple[int, str]]:
    """Path -> (size, sha256) of every file under `folder`, in the server's `snapshot()` format."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, sha256_of(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def make_published_folder(root: Path, seed: int = 0) -> Path:
    """A tiny folder shaped like a published Core ML repo: card, tokenizer files and two .mlpackage bundles.

    Weights (`*.bin`, `*.mlmodel`) take the LFS/xet path through the Hub's default .gitattributes; the UNet
    weight is above `MULTIPART_THRESHOLD`, so on the LFS path it is uploaded in parts.
    """
    rng = random.Random(seed)
    files = {
        "README.md": b"---\nlicense: apache-2.0\ntags:\n- coreml\n- stable-diffusion\n---\n# tiny\n",
        "merges.txt": b"#version: 0.2\nl o\nlo w</w>\n",
        "vocab.json": b'{"<|startoftext|>": 0, "<|endoftext|>": 1, "low</w>": 2}',
    }
    for component, weight_size in (("unet", 3 * MULTIPART_CHUNK + 1000), ("text_encoder", 20_000)):
        package = f"original/packages/Stable_Diffusion_version_tiny_{component}.mlpackage"
        files[f"{package}/Manifest.json"] = b'{"fileFormatVersion": "1.0.0", "itemInfoEntries": {}}'
        files[f"{package}/Data/com.apple.CoreML/model.mlmodel"] = rng.randbytes(2_000)
        files[f"{package}/Data/com.apple.CoreML/weights/weight.bin"] = rng.randbytes(weight_size)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root
