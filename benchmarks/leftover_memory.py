"""Peak memory of the first step after prompts whose length is not a multiple of K.

Builds a random-weight preset (S: vocabulary 128,256, K = 4), submits `--batch` prompts of
4m + 1 tokens (one leftover token each) and runs the prefill and the first decode step,
reporting the process's resident high-water mark above what the model and prefill used.
It also runs against the code before the engine (calm_cli.engine.Engine.stream), so the
two can be compared on one machine: run it from each checkout.

    python benchmarks/leftover_memory.py --preset S --batch 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def rss_peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="S")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--prompt-chunks", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    try:
        from calm_cli.bench.run import PRESETS, preset_configs
        from calm_cli.models.calm import CALM
        from calm_cli.runtime.engine import Engine
        from calm_cli.runtime.settings import GenerationSettings
        code = "engine"
    except ImportError:
        from calm_cli.engine import Engine, GenerationSettings
        from calm_cli.model import CALM

        from calm_cli.bench import PRESETS, preset_configs
        code = "before the engine"
    torch.manual_seed(0)
    model = CALM(*preset_configs(PRESETS[args.preset], 4)).eval().requires_grad_(False)
    k, vocab = 4, model.config.vocab_size
    prompts = torch.randint(3, vocab, (args.batch, args.prompt_chunks * k + 1)).tolist()
    settings = GenerationSettings(max_tokens=k, temperature=0.5, num_samples=args.samples, seed=0)
    with torch.inference_mode():
        if code == "engine":
            engine = Engine(model, max_batch=args.batch)
            for prompt in prompts:
                engine.submit(prompt, settings)
            engine._admit([])  # prefill alone first, so the peak below is the step's
            reset_peak()
            before = rss_peak_mb()
            t0 = time.perf_counter()
            engine.step()
        else:
            steps = Engine(model).stream(prompts, settings)
            reset_peak()
            before = rss_peak_mb()
            t0 = time.perf_counter()
            next(iter(steps))  # prefill (small) and the first chunk
    seconds = time.perf_counter() - t0
    print(json.dumps({
        "code": code, "preset": args.preset, "vocab": vocab, "batch": args.batch, "samples": args.samples,
        "first_step_peak_mb_above_model": round(rss_peak_mb() - before, 1), "seconds": round(seconds, 2),
    }))


if __name__ == "__main__":
    main()
