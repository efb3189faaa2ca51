"""Decode tokens/s of a CALM checkpoint per temperature, sampler, pool and candidate decoder (not a test).

`calm bench` covers temperatures, samplers and decoders; this adds the approximation's pool
(fixed N against the adaptive pool of `engine.POOL_BLOCK`) on held-out prompts, through
`Engine` itself, and prints candidates decoded per step next to tokens/s.

    python benchmarks/sampler_speed.py --model runs/calm/checkpoint [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import replace  # noqa: E402

from calm_cli.io.checkpoint import load_model  # noqa: E402
from calm_cli.runtime import runners  # noqa: E402
from calm_cli.runtime.engine import Engine  # noqa: E402
from calm_cli.runtime.sampling import SamplingStats  # noqa: E402
from calm_cli.runtime.settings import GenerationSettings  # noqa: E402

ADAPTIVE_BLOCK = 16


def run(model_engine: Engine, prompt: list[int], settings: GenerationSettings, repeats: int) -> tuple[float, float]:
    """Median decode tokens/s over `repeats` runs after a warm-up, and candidates decoded per row and step."""
    _decode(model_engine, prompt, settings)
    rates = []
    model_engine.sampling = SamplingStats()
    for seed in range(repeats):
        rates.append(_decode(model_engine, prompt, replace(settings, seed=seed)))
    stats = model_engine.sampling
    return statistics.median(rates), stats.draws / stats.rows


def _decode(model_engine: Engine, prompt: list[int], settings: GenerationSettings) -> float:
    request = model_engine.submit(prompt, settings)
    for _ in model_engine.run():
        pass
    return len(request.tokens) / request.decode_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/calm/checkpoint"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared/heldout.bin"))
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temps", default="1,0.5")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval().requires_grad_(False)
    ids = np.fromfile(args.data, dtype=np.uint16)
    prompt = [int(t) for t in ids[1000 : 1000 + args.prompt_tokens]]
    engines = {name: Engine(model, candidate_decoder=name) for name in ("dense", "fast")}
    print(f"{args.model}, {args.threads} thread(s), batch 1, {args.tokens} new tokens after {args.prompt_tokens} held-out ones")
    for temperature in [float(t) for t in args.temps.split(",")]:
        setups = [("exact", None), ("approx", None), ("approx", ADAPTIVE_BLOCK)] if temperature < 1 else [("approx", None)]
        for sampler, pool_block in setups:
            for name, model_engine in engines.items():
                runners.POOL_BLOCK = pool_block
                settings = GenerationSettings(max_tokens=args.tokens, temperature=temperature, sampler=sampler)
                rate, per_step = run(model_engine, prompt, settings, args.repeats)
                pool = "" if sampler == "exact" else (f" adaptive pool from {pool_block}" if pool_block else " fixed pool")
                print(f"T={temperature:g} {sampler}{pool} {name:5s}: {rate:7.1f} tok/s, {per_step:7.1f} candidates/step", flush=True)


if __name__ == "__main__":
    main()
