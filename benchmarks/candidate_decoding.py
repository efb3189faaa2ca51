"""Dense against fast candidate decoding, alone, on the shapes that matter (not a test).

Builds only an autoencoder: the preset-M shape with random weights (vocabulary 128,256,
hidden 512: every candidate latent is random, the hardest case for the certificate), and/or a
trained autoencoder fed posterior samples z = mu + s sigma eps of held-out text (what a
trained head's candidates look like), and/or a CALM checkpoint's own head candidates at
held-out positions.  For N candidates of K tokens it times `Autoencoder.decode_tokens`
(dense float32) and `FastCandidateDecoder` on the same latents, checks that the tokens are
identical, and reports how many rows needed float32 work.

    python benchmarks/candidate_decoding.py [--preset-m] [--ae runs/ae/checkpoint] [--samples 200,32,8]
    python benchmarks/candidate_decoding.py --calm runs/calm/checkpoint --positions 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_cli.io.checkpoint import load_autoencoder, load_model  # noqa: E402
from calm_cli.models.autoencoder import Autoencoder  # noqa: E402
from calm_cli.models.config import AutoencoderConfig  # noqa: E402
from calm_cli.runtime.fastdecode import FastCandidateDecoder, FastDecodeStats  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `repeats` calls after one warm-up call."""
    fn()
    laps = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        laps.append(time.perf_counter() - start)
    return 1000 * statistics.median(laps)


def posterior_latents(ae: Autoencoder, data: Path, count: int, spread: float, generator: torch.Generator) -> torch.Tensor:
    """`count` latents mu + spread * sigma * eps of random held-out chunks."""
    ids = torch.from_numpy(np.fromfile(data, dtype=np.uint16).astype(np.int64))
    k = ae.config.patch_size
    starts = torch.randint(0, len(ids) // k - 1, (count,), generator=generator) * k
    mean, log_std = ae.encode(torch.stack([ids[s : s + k] for s in starts.tolist()]))
    return (mean + spread * log_std.exp() * torch.randn(mean.shape, generator=generator))[:, 0]


def compare(name: str, ae: Autoencoder, latents: torch.Tensor, repeats: int) -> None:
    """One line: dense and fast milliseconds for these latents, speed-up, identity and rescoring counts."""
    fast = FastCandidateDecoder(ae)
    same = torch.equal(fast(latents), ae.decode_tokens(latents))
    fast.stats = counted = FastDecodeStats()
    fast(latents)
    fast.stats = FastDecodeStats()
    dense_ms = timed(lambda: ae.decode_tokens(latents), repeats)
    fast_ms = timed(lambda: fast(latents), repeats)
    hidden_ms = timed(lambda: ae.decoder.hidden(latents.unsqueeze(-2)), repeats)
    print(f"{name}: dense {dense_ms:8.1f} ms  fast {fast_ms:8.1f} ms  x{dense_ms / fast_ms:4.2f}  "
          f"(decoder MLP {hidden_ms:.1f} ms in both; without it x{(dense_ms - hidden_ms) / (fast_ms - hidden_ms):4.2f})  "
          f"identical {same}  rows {counted.rows}: float32 candidates {counted.rescored / counted.rows:.1%}, "
          f"dense {counted.dense / counted.rows:.1%}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset-m", action="store_true", help="the preset-M autoencoder shape, random weights")
    parser.add_argument("--ae", type=Path, help="a trained autoencoder directory")
    parser.add_argument("--calm", type=Path, help="a CALM checkpoint: its head's candidates at held-out positions")
    parser.add_argument("--positions", type=int, default=50, help="held-out positions for --calm (N candidates each)")
    parser.add_argument("--data", type=Path, default=Path("data/prepared/heldout.bin"))
    parser.add_argument("--samples", default="200,32,8", help="candidates per call (N); rows = N x K")
    parser.add_argument("--spreads", default="1,2", help="posterior spreads s for the trained autoencoder")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    counts = [int(n) for n in args.samples.split(",")]
    with torch.inference_mode():
        if args.preset_m:
            torch.manual_seed(0)
            config = AutoencoderConfig(vocab_size=128256, patch_size=4, hidden_size=512, intermediate_size=1280, latent_size=128)
            ae = Autoencoder(config).eval()
            for n in counts:
                compare(f"preset M, random, N={n:3d}", ae, torch.randn(n, 128, generator=generator), args.repeats)
        if args.ae:
            ae = load_autoencoder(args.ae).eval()
            for spread in [float(s) for s in args.spreads.split(",")]:
                for n in counts:
                    latents = posterior_latents(ae, args.data, n, spread, generator)
                    compare(f"{args.ae} posterior s={spread:g}, N={n:3d}", ae, latents, args.repeats)
        if args.calm:
            model = load_model(args.calm).eval()
            ids = torch.from_numpy(np.fromfile(args.data, dtype=np.uint16).astype(np.int64))
            starts = torch.randint(0, len(ids) - 64, (args.positions,), generator=generator).tolist()
            hidden = model.backbone_hidden(torch.stack([ids[s : s + 64] for s in starts]))[:, -1]
            for n in counts:
                latents = model.generative_head.sample(hidden, n, generator=generator).reshape(-1, model.config.latent_size)
                compare(f"{args.calm} head, {args.positions} positions x N={n:3d}", model.ae_model, latents, 1)


if __name__ == "__main__":
    main()
