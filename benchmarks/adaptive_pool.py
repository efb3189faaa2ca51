"""How concentrated a trained CALM's candidates are, and what that lets the samplers skip (not a test).

For positions of held-out text it draws many candidate chunks from the model (head samples
decoded by argmax) and reports, per position: distinct chunks per 200 candidates and the top
chunk's share.  Each position's empirical chunk distribution P^ then stands in for the model
(resampling from it costs no decoding), to compare per temperature:

* the fixed-N rule (N = 200 candidates, the authors' pool) and the adaptive pool (grown
  ``--pool-block`` at a time until settled, ``calm_cli.runtime.sampling.settled``): the total-variation
  distance between their selection distributions, each averaged exactly (Rao-Blackwellised)
  over ``--replicates`` simulated candidate sequences, and the candidates each needs;
* the exact sampler as the engine runs it (rounds of 8 doubling to 200): candidates per step.

Without a trained CALM, ``--emulate-ae DIR --spreads 1,2,4`` stands in for the head with an
autoencoder's posterior around real chunks, z = mu + s sigma eps (the issue's emulation).

    python benchmarks/adaptive_pool.py --model runs/calm/checkpoint [--positions 32] [--draws 2000]
    python benchmarks/adaptive_pool.py --emulate-ae runs/ae/checkpoint --spreads 1,2,4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_cli.io.checkpoint import load_autoencoder, load_model  # noqa: E402
from calm_cli.runtime.fastdecode import FastCandidateDecoder  # noqa: E402
from calm_cli.runtime.runners import EXACT_BLOCK  # noqa: E402
from calm_cli.runtime.sampling import (  # noqa: E402
    SETTLE_TV,
    SETTLE_Z,
    SamplingStats,
    selection_probabilities,
    settled,
    temperature_sample,
)

POOL = 200


def positions(model, data: Path, count: int, window: int, generator: torch.Generator) -> torch.Tensor:
    """Backbone states [count, H] after `window` tokens of held-out text, one per random window."""
    ids = torch.from_numpy(np.fromfile(data, dtype=np.uint16).astype(np.int64))
    starts = torch.randint(0, len(ids) - window, (count,), generator=generator)
    batch = torch.stack([ids[s : s + window] for s in starts.tolist()])
    return model.backbone_hidden(batch)[:, -1]


def draw_ids(model, decode, hidden: torch.Tensor, draws: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Per position, the category (index into its distinct chunks) of each of `draws` candidates."""
    out = []
    for h in hidden:
        chunks = torch.cat([decode(model.generative_head.sample(h[None], POOL, generator=generator))[0]
                            for _ in range(draws // POOL)])
        out.append(torch.unique(chunks, dim=0, return_inverse=True)[1])
    return out


def emulated_ids(ae, data: Path, count: int, spreads: list[float], draws: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Like `draw_ids`, with candidates mu + s sigma eps around `count` random held-out chunks per spread s."""
    ids = torch.from_numpy(np.fromfile(data, dtype=np.uint16).astype(np.int64))
    k, decode, out = ae.config.patch_size, FastCandidateDecoder(ae), []
    for spread in spreads:
        starts = torch.randint(0, len(ids) // k - 1, (count,), generator=generator) * k
        mean, log_std = ae.encode(torch.stack([ids[s : s + k] for s in starts.tolist()]))
        for mu, sigma in zip(mean[:, 0], log_std[:, 0].exp()):
            noise = torch.randn(draws, mu.numel(), generator=generator)
            out.append(torch.unique(decode(mu + spread * sigma * noise), dim=0, return_inverse=True)[1])
    return out


def concentration(ids: torch.Tensor) -> tuple[float, float]:
    """Mean distinct chunks per block of 200 draws, and the most frequent chunk's share overall."""
    blocks = ids[: len(ids) // POOL * POOL].reshape(-1, POOL)
    distinct = float(np.mean([len(torch.unique(b)) for b in blocks]))
    return distinct, float(torch.bincount(ids).max()) / len(ids)


def sequences_from(probs: torch.Tensor, replicates: int, generator: torch.Generator) -> torch.Tensor:
    """`replicates` candidate sequences of length N, as category ids drawn from `probs`."""
    return torch.multinomial(probs, replicates * POOL, replacement=True, generator=generator).reshape(replicates, POOL)


def boundaries(pool_block: int) -> list[int]:
    """Pool sizes at which the adaptive pool checks whether it is settled: pool_block, doubling, below N."""
    sizes = [pool_block]
    while 2 * sizes[-1] < POOL:
        sizes.append(2 * sizes[-1])
    return sizes


def rule_distributions(
    sequences: torch.Tensor, categories: int, temperature: float, pool_block: int, settle: float, z: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Selection distributions of the fixed-N rule and of the adaptive pool on the same sequences, and its mean draws.

    The adaptive pool stops at the first check below N where it is settled and stops checking
    once it looks hopeless, as ``temperature_sample(..., pool_block=...)`` does at batch 1;
    else it is the fixed pool.
    """
    beta, replicates = 1.0 / temperature, sequences.shape[0]

    def counts_at(drawn: int) -> torch.Tensor:
        ones = torch.ones(replicates, drawn, dtype=torch.long)
        return torch.zeros(replicates, categories, dtype=torch.long).scatter_add_(1, sequences[:, :drawn], ones)

    stop = torch.full((replicates,), POOL)
    checking = torch.ones(replicates, dtype=torch.bool)  # not settled and not yet given up on
    adaptive = torch.zeros(replicates, categories, dtype=torch.float64)
    for drawn in boundaries(pool_block):
        counts = counts_at(drawn)
        top = torch.cat([counts, counts.new_zeros(replicates, 1)], 1).topk(2, dim=1).values
        fresh = checking & settled(top[:, 0], top[:, 1], drawn, beta, settle, z)
        adaptive[fresh] = selection_probabilities(counts[fresh], temperature)
        stop[fresh] = drawn
        checking &= ~fresh & settled(top[:, 0] * POOL / drawn, top[:, 1] * POOL / drawn, POOL, beta, settle, z)
    fixed = selection_probabilities(counts_at(POOL), temperature)
    pending = stop == POOL
    adaptive[pending] = fixed[pending]
    return fixed.mean(0), adaptive.mean(0), float(stop.double().mean())


def exact_draws(probs: torch.Tensor, temperature: float, rows: int, generator: torch.Generator) -> float:
    """Candidates per step of the exact sampler as the engine runs it, drawing from `probs`."""
    def draw(n: int, rows_index: torch.Tensor | None = None) -> torch.Tensor:
        count = rows if rows_index is None else len(rows_index)
        return torch.multinomial(probs, count * n, replacement=True, generator=generator).reshape(count, n, 1)

    stats = SamplingStats()
    temperature_sample(lambda n, rows=None: draw(n, rows), temperature, method="exact", num_samples=POOL,
                       generator=generator, block=EXACT_BLOCK, max_block=POOL, stats=stats)
    return stats.draws / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/calm/checkpoint"))
    parser.add_argument("--emulate-ae", type=Path, help="an autoencoder directory: emulate the head by its posterior")
    parser.add_argument("--spreads", default="1,2,4", help="posterior spreads s for --emulate-ae")
    parser.add_argument("--data", type=Path, default=Path("data/prepared/heldout.bin"))
    parser.add_argument("--positions", type=int, default=32)
    parser.add_argument("--window", type=int, default=64, help="tokens of context per position (a multiple of K)")
    parser.add_argument("--draws", type=int, default=2000, help="candidates drawn per position (a multiple of 200)")
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--variants", default=f"16:{SETTLE_TV}:{SETTLE_Z}",
                        help="adaptive pools to compare, pool_block:settle:z separated by commas")
    parser.add_argument("--temps", default="0.5,0.7,0.333333")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    variants = [(int(b), float(e), float(z)) for b, e, z in (v.split(":") for v in args.variants.split(","))]
    source = f"{args.emulate_ae} posterior s={args.spreads}" if args.emulate_ae else str(args.model)
    with torch.inference_mode():
        if args.emulate_ae:
            ae = load_autoencoder(args.emulate_ae).eval()
            spreads = [float(x) for x in args.spreads.split(",")]
            ids = emulated_ids(ae, args.data, args.positions, spreads, args.draws, generator)
        else:
            model = load_model(args.model).eval().requires_grad_(False)
            hidden = positions(model, args.data, args.positions, args.window, generator)
            ids = draw_ids(model, FastCandidateDecoder(model.ae_model), hidden, args.draws, generator)
    report: dict = {"source": source, "positions": len(ids), "draws": args.draws, "per_position": [], "temps": {}}
    for chunk_ids in ids:
        distinct, share = concentration(chunk_ids)
        report["per_position"].append({"distinct_per_200": distinct, "top_share": round(share, 4)})
    distinct = [p["distinct_per_200"] for p in report["per_position"]]
    shares = [p["top_share"] for p in report["per_position"]]
    print(f"{source}: distinct chunks per 200 candidates: median {np.median(distinct):.1f}, mean {np.mean(distinct):.1f}, "
          f"quartiles {np.percentile(distinct, 25):.1f}-{np.percentile(distinct, 75):.1f}; "
          f"top chunk share: median {np.median(shares):.3f}, quartiles {np.percentile(shares, 25):.3f}-{np.percentile(shares, 75):.3f}")
    for temperature in [float(t) for t in args.temps.split(",")]:
        beta = 1.0 / temperature
        to_target, exact = [], []
        per_variant: dict[tuple, tuple[list, list]] = {v: ([], []) for v in variants}
        for chunk_ids in ids:
            probs = torch.bincount(chunk_ids).double() / len(chunk_ids)
            target = probs**beta / (probs**beta).sum()
            sequences = sequences_from(probs, args.replicates, generator)
            for variant in variants:
                fixed, adaptive, stop = rule_distributions(sequences, probs.numel(), temperature, *variant)
                per_variant[variant][0].append(0.5 * float((fixed - adaptive).abs().sum()))
                per_variant[variant][1].append(stop)
            to_target.append(0.5 * float((fixed - target).abs().sum()))
            exact.append(exact_draws(probs, temperature, 500, generator))
        row = {"fixed_vs_target_tv_mean": float(np.mean(to_target)), "exact_draws_mean": float(np.mean(exact)),
               "fixed_draws": POOL, "adaptive": []}
        print(f"T={temperature:.3f}: fixed N={POOL} vs the tempered P^: TV mean {row['fixed_vs_target_tv_mean']:.4f}; "
              f"exact sampler: {row['exact_draws_mean']:.1f} candidates/step")
        for (block, settle_tv, z), (tvs, stops) in per_variant.items():
            row["adaptive"].append({"pool_block": block, "settle": settle_tv, "z": z, "tv_mean": float(np.mean(tvs)),
                                    "tv_max": float(np.max(tvs)), "draws_mean": float(np.mean(stops))})
            print(f"  adaptive block {block} settle {settle_tv} z {z}: TV to fixed N mean {np.mean(tvs):.4f} "
                  f"max {np.max(tvs):.4f}, {np.mean(stops):.1f} candidates/step")
        report["temps"][str(temperature)] = row
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
