"""Time the approximate sampler's counting + selection per decoding step (not a test).

The pool is drawn once by a fake sampler, so the numbers exclude the model: they are the
overhead `calm_cli.runtime.sampling` adds on top of decoding the candidates.

    python benchmarks/sampling_overhead.py [--device cuda] [--repeats 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_cli.runtime.sampling import select_from_pool  # noqa: E402

VOCAB = 128256
CHUNK = 4
POOL = 200


def fake_pool(rows: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """A pool with realistic repeats: candidates from 64 random chunks with Zipf-like odds."""
    chunks = torch.randint(0, VOCAB, (rows, 64, CHUNK), generator=generator)
    odds = 1.0 / torch.arange(1, 65, dtype=torch.float64)
    picks = torch.multinomial(odds.expand(rows, -1), POOL, replacement=True, generator=generator)
    return chunks.gather(1, picks.unsqueeze(2).expand(-1, -1, CHUNK)).to(device)


def time_step(pool: torch.Tensor, temperature: float, repeats: int) -> float:
    """Milliseconds per call of counting + selection, after a warm-up call."""
    generator = torch.Generator(device=pool.device).manual_seed(0)
    sync = torch.cuda.synchronize if pool.device.type == "cuda" else (lambda: None)
    select_from_pool(pool, temperature, generator=generator)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        select_from_pool(pool, temperature, generator=generator)
    sync()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} N={POOL} K={CHUNK}")
    for rows in (1, 32):
        pool = fake_pool(rows, device, generator)
        for temperature in (0.5, 0.45, 0.0):
            ms = time_step(pool, temperature, args.repeats)
            print(f"rows={rows:3d} T={temperature:<5} counting+selection: {ms:7.3f} ms/step")


if __name__ == "__main__":
    main()
