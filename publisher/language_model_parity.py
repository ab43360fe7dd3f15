"""Language-model parity: the stateful package against transformers in fp32, prefill then decode.

The reference: for each prompt, transformers' fp32 model decodes ``parity.decode_steps`` greedy tokens, and
one forward over the prompt and those tokens gives its logits at every position. The package, through the
executor (or Core ML on macOS), is prefilled with the prompt, then fed the reference's tokens one at a time
with its state carried between calls: teacher forcing, so that a step's comparison measures that step and not
an earlier divergence echoed through different inputs. The state update is what decode exercises: a package
whose cache writes are wrong agrees at prefill and diverges from the first decode step.

Measured per prompt and backend: the logits PSNR over the prompt's positions (prefill) and at the worst decode
step, the share of predicted positions (the prefill's last and every decode step's) whose top-1 token is the
reference's, and the first step where it is not. The gate's thresholds default per compression scheme
(:func:`default_thresholds`) and a recipe's ``parity.min_psnr`` / ``parity.min_token_agreement`` override them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from publisher import executor
from publisher.errors import ParityError
from publisher.language_model import CAUSAL_MASK, INPUT_IDS, LOGITS, causal_mask
from publisher.language_model_source import LanguageModelSource
from publisher.parity import COREML_RUNTIME, backends, psnr
from publisher.recipe import Recipe, Scheme
from publisher.report import ParityResult, TokenParity

COMPONENT = "language_model"
# (logits PSNR dB, top-1 agreement) a package must reach, by the fewest bits its scheme stores a weight in.
# Set for trained checkpoints, whose logits are peaked and whose weights quantize gently. Random weights are
# harsher: the tiny test families reach 29-60 dB and full agreement uncompressed, ~30 dB and 82-94% at 8 bits,
# ~8-17 dB and 29-41% at 4 bits, so the tiny recipes state their own thresholds (a broken state update gives
# 5-9 dB and 0%, tests/test_language_models.py).
DEFAULT_THRESHOLDS = {16: (35.0, 0.95), 8: (28.0, 0.9), 6: (22.0, 0.8), 4: (18.0, 0.7)}


def scheme_bits(scheme: Scheme) -> int:
    """The fewest bits ``scheme`` stores a weight in (16 uncompressed)."""
    bits = [16]
    if scheme.palettize and scheme.palettize.nbits:
        bits.append(scheme.palettize.nbits)
    if scheme.palettize and scheme.palettize.mixed:
        bits.append(min(scheme.palettize.mixed.candidates))
    if scheme.quantize:
        bits.append(scheme.quantize.nbits)
    return min(bits)


def default_thresholds(recipe: Recipe) -> tuple[float, float]:
    """The gate's (PSNR, agreement): the recipe's own where it sets them, else its scheme's defaults."""
    bits = scheme_bits(recipe.compression.for_component(COMPONENT))
    psnr_default, agreement_default = next(value for limit, value in sorted(DEFAULT_THRESHOLDS.items())
                                           if bits <= limit)
    parity = recipe.parity
    min_psnr = parity.threshold(COMPONENT) if {"min_psnr", "per_component"} & parity.model_fields_set \
        else psnr_default
    agreement = parity.min_token_agreement if parity.min_token_agreement is not None else agreement_default
    return min_psnr, agreement


@dataclass(frozen=True)
class TokenReference:
    """One prompt's tokens (prompt, then the reference's greedy ones) and transformers' logits at each position."""

    prompt: str
    prompt_tokens: int
    tokens: np.ndarray
    logits: np.ndarray


def reference_tokens(recipe: Recipe, source: LanguageModelSource) -> list[TokenReference]:
    """transformers' fp32 greedy decode of every card prompt; computed once for every variant."""
    model = source.model()
    references = []
    with torch.no_grad():
        for prompt in recipe.card.prompts:
            ids = source.tokenizer(prompt, return_tensors="pt").input_ids[:, : recipe.conversion.context_length // 2]
            sequence = ids
            for _ in range(recipe.parity.decode_steps):
                next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
                sequence = torch.cat([sequence, next_token], dim=-1)
            logits = model(sequence).logits[0].numpy()
            references.append(TokenReference(prompt, ids.shape[1], sequence[0].numpy(), logits))
    return references


def save_references(references: list[TokenReference], path: Path) -> None:
    np.savez(path, **{f"{index}/{name}": value for index, reference in enumerate(references)
                      for name, value in (("prompt", np.array(reference.prompt)),
                                          ("prompt_tokens", np.array(reference.prompt_tokens)),
                                          ("tokens", reference.tokens), ("logits", reference.logits))})


def load_references(path: Path) -> list[TokenReference]:
    with np.load(path) as archive:
        count = len({key.split("/")[0] for key in archive.files})
        return [TokenReference(str(archive[f"{index}/prompt"]), int(archive[f"{index}/prompt_tokens"]),
                               archive[f"{index}/tokens"], archive[f"{index}/logits"]) for index in range(count)]


Step = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _session(package: Path, backend: str, programs: dict[Path, executor.LoadedProgram]) -> Callable[[], Step]:
    """A factory of fresh decoding sessions on ``backend``: each holds its own state, zeroed as Core ML's is."""
    if backend == COREML_RUNTIME:
        import coremltools as ct

        model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_ONLY)

        def coreml_session() -> Step:
            state = model.make_state()
            return lambda ids, mask: model.predict({INPUT_IDS: ids, CAUSAL_MASK: mask}, state=state)[LOGITS]

        return coreml_session
    if package not in programs:
        programs[package] = executor.load_program(package)
    program = programs[package]
    mode: executor.Mode = backend.removeprefix("executor-")  # type: ignore[assignment]

    def executor_session() -> Step:
        state = executor.make_state(program)
        return lambda ids, mask: executor.run(program, {INPUT_IDS: ids, CAUSAL_MASK: mask}, state=state,
                                              mode=mode)[LOGITS]

    return executor_session


def measure_prompt(step: Step, reference: TokenReference) -> tuple[float, float, float, int | None]:
    """(prefill PSNR, worst decode-step PSNR, top-1 agreement, first divergence) of one session on one prompt."""
    count = reference.prompt_tokens
    tokens = reference.tokens.astype(np.int32)[None, :]
    prefill = step(tokens[:, :count], causal_mask(count, count))[0]
    predicted = [prefill[-1]]
    for position in range(count, tokens.shape[1]):
        predicted.append(step(tokens[:, position:position + 1], causal_mask(1, position + 1))[0, -1])
    expected = reference.logits[count - 1:]
    decode_psnr = min(psnr(want, got) for want, got in zip(expected[1:], predicted[1:], strict=True))
    matches = [int(np.argmax(got) == np.argmax(want)) for want, got in zip(expected, predicted, strict=True)]
    first = next((index for index, match in enumerate(matches) if not match), None)
    return psnr(reference.logits[:count], prefill), decode_psnr, float(np.mean(matches)), first


def measure_language_model(package: Path, references: list[TokenReference], variant: str,
                           on: tuple[str, ...] | None = None) -> list[TokenParity]:
    """Every prompt on every backend (default: all available), with the thresholds left for :func:`gate`."""
    programs: dict[Path, executor.LoadedProgram] = {}
    rows = []
    for backend in on or backends():
        session = _session(package, backend, programs)
        for reference in references:
            prefill, decode, agreement, first = measure_prompt(session(), reference)
            rows.append(TokenParity(prompt=reference.prompt, variant=variant, backend=backend,
                                    prompt_tokens=reference.prompt_tokens,
                                    decode_steps=len(reference.tokens) - reference.prompt_tokens,
                                    prefill_psnr_db=round(prefill, 2), decode_psnr_db=round(decode, 2),
                                    token_agreement=round(agreement, 4), first_divergence=first,
                                    threshold_db=0.0, min_token_agreement=0.0, passed=False))
    return rows


def judge(recipe: Recipe, rows: list[TokenParity]) -> tuple[list[TokenParity], list[ParityResult]]:
    """The rows with the thresholds' verdicts, and one PSNR row per backend for the parity table (its worst)."""
    min_psnr, min_agreement = default_thresholds(recipe)
    judged = [row.model_copy(update={
        "threshold_db": min_psnr, "min_token_agreement": min_agreement,
        "passed": min(row.prefill_psnr_db, row.decode_psnr_db) >= min_psnr and row.token_agreement >= min_agreement,
    }) for row in rows]
    summary = []
    for backend in dict.fromkeys(row.backend for row in judged):
        same = [row for row in judged if row.backend == backend]
        summary.append(ParityResult(component=COMPONENT, variant=same[0].variant, backend=backend,
                                    threshold_db=min_psnr, passed=all(row.passed for row in same),
                                    psnr_db=min(min(row.prefill_psnr_db, row.decode_psnr_db) for row in same)))
    return judged, summary


def gate(recipe: Recipe, rows: list[TokenParity]) -> tuple[list[TokenParity], list[ParityResult]]:
    """:func:`judge`, failing the run where a row fails.

    Raises:
        `ParityError`: a prompt on a backend is under the PSNR or the agreement threshold (exit 3).
    """
    judged, summary = judge(recipe, rows)
    failed = [row for row in judged if not row.passed]
    if failed:
        worst = min(failed, key=lambda row: (row.token_agreement, row.decode_psnr_db))
        raise ParityError(
            f"parity failed: language_model ({worst.variant}) on {worst.backend}, prompt {worst.prompt!r}: prefill"
            f" {worst.prefill_psnr_db:.1f} dB, decode {worst.decode_psnr_db:.1f} dB (threshold {worst.threshold_db:g}),"
            f" top-1 agreement {worst.token_agreement:.0%} (threshold {worst.min_token_agreement:.0%}, first"
            f" divergence at step {worst.first_divergence}); use a milder compression scheme or set"
            " parity.min_psnr / parity.min_token_agreement in the recipe")
    return judged, summary
