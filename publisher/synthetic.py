"""Random-weight diffusers pipelines and transformers language models built from configs alone.

The Hub is unreachable from CI and from this project's machines, yet the loading code must be the
real one (`from_pretrained` on a folder). So the offline demo, the tests and the full-size
benchmarks build pipelines from the architecture configs shipped in `configs/`, with seeded random
weights, and save them with `save_pretrained`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import diffusers
import torch
import transformers

from publisher.source_check import library_class


def build_pipeline(config_dir: Path, out_dir: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Build the pipeline described by ``config_dir`` with random weights and save it to ``out_dir``.

    ``config_dir`` is laid out like a Hub pipeline repo without weights: ``model_index.json`` plus one
    folder per component holding its config (and, for tokenizers and schedulers, their files).
    The output is written to a temporary sibling and renamed into place, so an interrupted build
    never leaves a folder that looks complete.
    """
    if not (config_dir / "model_index.json").is_file():
        return build_language_model(config_dir, out_dir, seed=seed, dtype=dtype)
    index = json.loads((config_dir / "model_index.json").read_text())
    with _staged(config_dir, out_dir, seed) as staging:
        for name, spec in sorted(index.items()):
            cls = library_class(*spec) if isinstance(spec, list) and len(spec) == 2 else None
            if cls is None:
                continue
            component_dir = config_dir / name
            if issubclass(cls, diffusers.ModelMixin):
                model = cls.from_config(cls.load_config(component_dir))
            elif issubclass(cls, transformers.PreTrainedModel):  # the safety checker too
                model = cls(transformers.AutoConfig.from_pretrained(component_dir))
            else:
                continue  # schedulers, tokenizers and feature extractors are copied as files
            if dtype != torch.float32:
                model = model.to(dtype)
            model.save_pretrained(staging / name, safe_serialization=True)
            del model
    return out_dir


def build_language_model(config_dir: Path, out_dir: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32
                         ) -> Path:
    """A transformers causal LM folder (``config.json`` and tokenizer files) with seeded random weights."""
    with _staged(config_dir, out_dir, seed) as staging:
        config = transformers.AutoConfig.from_pretrained(config_dir)
        transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(
            staging, safe_serialization=True)
    return out_dir


@contextmanager
def _staged(config_dir: Path, out_dir: Path, seed: int) -> Iterator[Path]:
    """A temporary sibling of ``out_dir`` holding a copy of ``config_dir``, seeded, renamed to ``out_dir`` when
    the block ends without error (removed otherwise): an interrupted build never leaves a complete-looking folder."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shutil.copytree(config_dir, staging, dirs_exist_ok=True)
        torch.manual_seed(seed)
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def write_tiny_clip_tokenizer(folder: Path, model_max_length: int = 77) -> None:
    """A CLIP BPE tokenizer with no merges: every byte is a token, so any prompt tokenizes.

    Ids: bytes 0-255, their end-of-word forms 256-511, then ``<|startoftext|>`` (512) and
    ``<|endoftext|>`` (513), matching the tiny text encoder's ``bos``/``eos`` ids.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": 256 + index for index, symbol in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
