"""Per-token decode time of a published language-model package through the executor, against transformers fp32.

Both decode the same tokens after the same prompt, one token per call with the KV cache kept (transformers'
DynamicCache; the package's state), in interleaved rounds so that machine load hits both alike. Prints the median
seconds per token of each and their ratio (issue 20's target: the executor within 1.5x of transformers fp32).

    .venv/bin/python benchmarks/decode.py OUT/original/packages/Llama-3.2-1B.mlpackage MODEL_FOLDER --tokens 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from random_sources import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path, help="the published .mlpackage")
    parser.add_argument("model", type=Path, help="the transformers model folder it was converted from")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["fp16", "fp32"], help="executor modes")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, DynamicCache

    from publisher import executor
    from publisher.language_model import CAUSAL_MASK, INPUT_IDS, LOGITS, causal_mask

    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    started = time.perf_counter()
    program = executor.load_program(args.package)
    load_seconds = time.perf_counter() - started
    prompt = np.arange(1, args.prompt_tokens + 1, dtype=np.int32)[None]
    steps = np.arange(100, 100 + args.tokens, dtype=np.int32)

    def torch_round() -> float:
        cache = DynamicCache(config=model.config)
        model(torch.from_numpy(prompt).long(), cache=cache, use_cache=True)
        started = time.perf_counter()
        for token in steps:
            model(torch.tensor([[int(token)]]), cache=cache, use_cache=True)
        return (time.perf_counter() - started) / len(steps)

    def executor_round(mode: str) -> float:
        state = executor.make_state(program)
        count = prompt.shape[1]
        executor.run(program, {INPUT_IDS: prompt, CAUSAL_MASK: causal_mask(count, count)}, state=state, mode=mode)
        started = time.perf_counter()
        for index, token in enumerate(steps):
            end = count + index + 1
            logits = executor.run(program, {INPUT_IDS: np.array([[token]], np.int32),
                                            CAUSAL_MASK: causal_mask(1, end)}, state=state, mode=mode)[LOGITS]
        assert np.isfinite(logits).all()
        return (time.perf_counter() - started) / len(steps)

    times: dict[str, list[float]] = {"transformers fp32": []} | {f"executor {mode}": [] for mode in args.modes}
    for _ in range(args.rounds):
        times["transformers fp32"].append(torch_round())
        for mode in args.modes:
            times[f"executor {mode}"].append(executor_round(mode))

    print(f"\nmachine: {machine()}")
    print(f"{args.package.name}: {args.prompt_tokens}-token prompt, {args.tokens} decode steps x {args.rounds} rounds;"
          f" package loaded (parsed, weights decompressed) in {load_seconds:.1f} s\n")
    baseline = statistics.median(times["transformers fp32"])
    print("| decoder | median s / token | x transformers fp32 |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / baseline:.2f}x |")


if __name__ == "__main__":
    main()
