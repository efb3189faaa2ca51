"""Peak memory per rank of `calm train calm` with DDP against FSDP2 (--shard), two CPU processes on gloo (not a test).

Builds a bench preset's CALM (random weights, K = 4, the frozen autoencoder included) in
each of two processes set up as torchrun would, trains `--steps` optimizer steps on random
tokens through `calm_cli.training.train.train`, and reports each rank's resident
high-water mark (VmHWM) at the end, rank 0's before the final save (which gathers the whole
checkpoint there), the one once the autoencoder is built, and the seconds, per mode. On CUDA the
figure that matters is torch.cuda.max_memory_allocated; this measures the CPU case.

    python benchmarks/shard_memory.py --preset M
    python benchmarks/shard_memory.py --preset S --steps 2 --block 128
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leftover_memory import rss_peak_mb  # noqa: E402  (benchmarks/ is this script's folder, first on sys.path)


def _rank(rank: int, port: int, args: argparse.Namespace, shard: bool, report: Path) -> None:
    import torch

    from calm_cli.bench.run import PRESETS, preset_configs
    from calm_cli.training.objectives import build_model
    from calm_cli.training.train import TrainOptions, train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    config, ae_config = preset_configs(PRESETS[args.preset], 4)
    torch.manual_seed(0)
    autoencoder = build_model("autoencoder", ae_config)
    built = rss_peak_mb()
    tokens = torch.randint(0, config.vocab_size, (1 << 16,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    started, training_peak = time.perf_counter(), [0.0]

    def before_save(record: dict) -> None:  # rank 0 only: its peak before the final save gathers the checkpoint
        if record["event"] == "train":
            training_peak[0] = rss_peak_mb()

    with tempfile.TemporaryDirectory() as out:
        options = TrainOptions(out=Path(out), block_size=args.block, batch_size=2, max_steps=args.steps, warmup_steps=1,
                               eval_every=0, log_every=1, threads=1, progress=False, target_samples=4, shard=shard,
                               callback=before_save)
        train("calm", options, tokens, None, config=config, autoencoder=autoencoder)
    report.write_text(json.dumps({"rank": rank, "peak_mb": round(rss_peak_mb()), "peak_before_save_mb": round(training_peak[0]) or None,
                                  "ae_built_mb": round(built), "seconds": round(time.perf_counter() - started, 1)}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="M")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--block", type=int, default=64, help="tokens per block (each rank trains one block a step)")
    parser.add_argument("--modes", default="ddp,fsdp2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for mode in args.modes.split(","):
            reports = [Path(folder) / f"{mode}-{rank}.json" for rank in (0, 1)]
            mp.spawn(_by_rank, args=(_free_port(), args, mode == "fsdp2", reports), nprocs=2)
            rows = [json.loads(path.read_text()) for path in reports]
            print(json.dumps({"preset": args.preset, "mode": mode, "ranks": rows}), flush=True)


def _by_rank(rank: int, port: int, args: argparse.Namespace, shard: bool, reports: list[Path]) -> None:
    _rank(rank, port, args, shard, reports[rank])


if __name__ == "__main__":
    main()
