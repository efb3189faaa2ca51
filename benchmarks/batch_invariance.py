"""How often a request's tokens differ between decoding alone and beside others, on a real model.

Each request has its own random stream, so only floating point can make them differ: a
batched matmul may round a row differently from a single-row one, and a near-tie in the
candidate decoding or the head can then flip. This counts requests (and tokens) that
differ over many prompts and seeds.

    python benchmarks/batch_invariance.py --model weights/default --requests 48 --max-batch 8
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_cli.io.checkpoint import load_model  # noqa: E402
from calm_cli.runtime.engine import Engine  # noqa: E402
from calm_cli.runtime.settings import GenerationSettings  # noqa: E402

WORDS = "the history of a river town under old kings who wrote letters about war and peace in winter".split()


def run(engine: Engine, prompts: list[list[int]], settings: list[GenerationSettings]) -> list[list[int]]:
    requests = [engine.submit(p, s) for p, s in zip(prompts, settings)]
    for _ in engine.run():
        pass
    return [r.tokens for r in requests]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="weights/default")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--candidate-dtype", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 12))) for _ in range(args.requests)]
    prompts = [model.tokenizer.encode(t).ids for t in texts]
    report = {}
    for temperature in (1.0, 0.5):
        settings = [GenerationSettings(max_tokens=args.tokens, temperature=temperature, seed=1000 + i) for i in range(args.requests)]
        together = run(Engine(model, max_batch=args.max_batch, candidate_dtype=args.candidate_dtype), prompts, settings)
        alone_engine = Engine(model, max_batch=1, candidate_dtype=args.candidate_dtype)
        alone = [run(alone_engine, [p], [s])[0] for p, s in zip(prompts, settings)]
        differ = [i for i in range(args.requests) if alone[i] != together[i]]
        tokens = sum(len(a) for a in alone)
        first = [next((j for j, (x, y) in enumerate(zip(alone[i], together[i])) if x != y), min(len(alone[i]), len(together[i])))
                 for i in differ]
        report[f"T={temperature}"] = {"requests": args.requests, "differ": len(differ), "tokens": tokens,
                                      "first_difference_at_token": first}
        print(f"T={temperature}: {len(differ)} of {args.requests} requests differ", file=sys.stderr)
    print(json.dumps({"model": args.model, "max_batch": args.max_batch, "max_tokens": args.tokens,
                      "candidate_dtype": args.candidate_dtype, **report}))


if __name__ == "__main__":
    main()
