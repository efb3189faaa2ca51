"""How far the bf16 candidate path moves the sampler from the float32 one (not a test).

At fixed backbone states (positions of one English prompt) it draws one chunk per seed with
the float32 runner and with the bf16 runner (head and decoder layers in bf16, argmax still
certified in float32), and reports

* candidate agreement: the same noise through both paths, the share of the N candidate
  chunks (and of their tokens) that come out identical;
* total variation between the chosen-chunk distributions of the two paths over S seeds,
  next to the same statistic between two float32 runs with different seeds (the sampling
  noise floor at this S: a bf16 TV at that floor means no difference is visible).

    python benchmarks/candidate_precision.py [-m weights/default] [--seeds 1000] [--temp 0.5]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_cli.io.checkpoint import load_model  # noqa: E402
from calm_cli.runtime.rng import RowRandom  # noqa: E402
from calm_cli.runtime.runners import CALMRunner  # noqa: E402
from calm_cli.runtime.sampling import SamplingStats  # noqa: E402
from calm_cli.runtime.settings import GenerationSettings  # noqa: E402

PROMPT = "The history of the city begins in the early years of the nineteenth century, when a small group of"
BATCH = 50  # seeds per call: bounds the fast decoder's score tiles


def chosen(runner: CALMRunner, hidden: torch.Tensor, seeds: range, settings: GenerationSettings) -> Counter:
    """How often each chunk is chosen at state `hidden` [H] over `seeds`."""
    counts: Counter = Counter()
    for start in range(seeds.start, seeds.stop, BATCH):
        batch = list(range(start, min(start + BATCH, seeds.stop)))
        rng = RowRandom.from_seeds(batch)
        rows = hidden.expand(len(batch), -1).contiguous()
        counts.update(map(tuple, runner.sample(rows, rng, settings, SamplingStats()).tolist()))
    return counts


def total_variation(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[key] / na - b[key] / nb) for key in set(a) | set(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default="weights/default")
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--temp", type=float, default=0.5)
    parser.add_argument("--positions", default="4,8,12")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model).float().eval()
    exact, low = CALMRunner(model, "fast", "float32"), CALMRunner(model, "fast", "bf16")
    ids = torch.tensor(model.tokenizer.encode(PROMPT).ids)
    ids = ids[: len(ids) // model.config.patch_size * model.config.patch_size][None]
    settings = GenerationSettings(temperature=args.temp)
    with torch.inference_mode():
        states = model.backbone_hidden(ids)[0]
        for position in map(int, args.positions.split(",")):
            hidden = states[position]
            rng = RowRandom.from_seeds([position])
            a = exact.pool.decode_chunks(exact.pool.latents(hidden[None], rng, 200))
            rng = RowRandom.from_seeds([position])
            b = low.pool.decode_chunks(low.pool.latents(hidden[None], rng, 200))
            chunk_agree = (a == b).all(-1).float().mean().item()
            token_agree = (a == b).float().mean().item()
            s = args.seeds
            f32 = chosen(exact, hidden, range(0, s), settings)
            floor = chosen(exact, hidden, range(s, 2 * s), settings)
            bf16 = chosen(low, hidden, range(0, s), settings)
            print(
                f"position {position}: candidates agree {chunk_agree:.3f} (tokens {token_agree:.3f}); "
                f"T={args.temp} over {s} seeds: TV(float32, bf16) {total_variation(f32, bf16):.3f}, "
                f"TV(float32, float32 other seeds) {total_variation(f32, floor):.3f}; "
                f"distinct chosen chunks {len(f32)}, top share {f32.most_common(1)[0][1] / s:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
