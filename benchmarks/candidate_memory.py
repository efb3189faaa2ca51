"""Peak memory of one T = 0.5 candidate step, whole pool against the per-device logit budget (not a test).

Builds the CALM-XL preset's energy head and autoencoder (random weights, vocabulary 128,256,
K = 4; the 1.8B backbone is left on the meta device: a candidate step never touches it) as
`calm bench --preset XL` builds them, and runs `CALMRunner.sample` once for `--slots` rows of
`--samples` candidates at T = 0.5.  Each mode runs in a fresh subprocess:

* whole: the budget raised past the step's logits, so every decode holds its whole pool's
  logits at once (the code before budget.py);
* sliced: the device's budget (calm_cli/runtime/budget.py).

It reports the peak above what was allocated before the step: torch.cuda.max_memory_allocated
on CUDA, the resident high-water mark (VmHWM, reset through /proc/self/clear_refs) on Linux CPUs.

    python benchmarks/candidate_memory.py --device cuda
    python benchmarks/candidate_memory.py --device cpu --modes sliced     # whole needs 26 GB at 64 slots
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leftover_memory import rss_peak_mb  # noqa: E402  (benchmarks/ is this script's folder, first on sys.path)

from calm_cli.runtime.budget import logit_budget, logit_elements  # noqa: E402


def measure(args: argparse.Namespace) -> dict:
    """One step in this process, in `args.mode`; the figures as a dict."""
    import torch

    from calm_cli.bench.run import PRESETS, _build, preset_configs
    from calm_cli.models.autoencoder import Autoencoder
    from calm_cli.models.calm import CALM
    from calm_cli.models.head import GenerativeHead
    from calm_cli.runtime import budget
    from calm_cli.runtime.device import resolve_device, resolve_dtype
    from calm_cli.runtime.rng import RowRandom
    from calm_cli.runtime.runners import CALMRunner
    from calm_cli.runtime.sampling import SamplingStats
    from calm_cli.runtime.settings import GenerationSettings

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config, ae_config = preset_configs(PRESETS[args.preset], 4)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = CALM(config, ae_config)
    model.generative_head = _build(device, dtype, GenerativeHead, config)
    model.ae_model = _build(device, dtype, Autoencoder, ae_config)
    model.eval().requires_grad_(False)
    runner = CALMRunner(model, args.decoder, "auto")
    settings = GenerationSettings(temperature=0.5, num_samples=args.samples)
    logits = logit_elements(args.slots, args.samples, 4, ae_config.vocab_size)
    if args.mode == "whole":
        budget.LOGIT_BUDGET[device.type] = logits
    hidden = torch.randn(args.slots, config.hidden_size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    rng = RowRandom.from_seeds(list(range(args.slots)), device=device)
    with torch.inference_mode():
        runner.sample(hidden[:1], rng.rows(torch.tensor([0], device=device)), settings, SamplingStats())  # prepares W
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            start = rss_peak_mb() * 2**20
        t0 = time.perf_counter()
        chunks = runner.sample(hidden, rng, settings, SamplingStats()).cpu()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_peak_mb() * 2**20
    return {
        "mode": args.mode, "device": str(device), "dtype": str(dtype).removeprefix("torch."), "decoder": args.decoder,
        "pool_dtype": str(runner.pool.dtype).removeprefix("torch."), "preset": args.preset, "slots": args.slots,
        "samples": args.samples, "whole_pool_logits": logits, "budget_logits": budget.logit_budget(device.type),
        "peak_mb_above_start": round((peak - start) / 2**20, 1), "seconds": round(seconds, 2), "chunks": list(chunks.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="the model's dtype: auto is bf16 on CUDA, float32 on CPU")
    parser.add_argument("--decoder", default="fast", choices=["fast", "dense"])
    parser.add_argument("--preset", default="XL")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--modes", default="whole,sliced")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # set for the child process that measures
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args)), flush=True)
        return
    for mode in args.modes.split(","):
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True, text=True)
        if done.returncode:
            print(json.dumps({"mode": mode, "error": done.stderr.strip().splitlines()[-1:]}), flush=True)
        else:
            print(done.stdout.strip(), flush=True)
    print(json.dumps({"budget_logits": {d: logit_budget(d) for d in ("cpu", "cuda")}}))


if __name__ == "__main__":
    main()
