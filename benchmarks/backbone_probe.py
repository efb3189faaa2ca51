"""How much a trained CALM backbone knows about the next token (a diagnostic; not a test).

A linear softmax probe is fitted on frozen backbone hidden states (position t, having read
chunks 0..t) to predict the first token of chunk t + 1, then scored on held-out blocks; the
unigram distribution of the training tokens is the floor. If the probe is near the floor,
the backbone has learned little beyond token frequencies, whatever the head does.

    python benchmarks/backbone_probe.py runs/calm/checkpoint data/prepared [--train-blocks 240] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_cli.io.checkpoint import load_model  # noqa: E402
from calm_cli.training.train import heldout_blocks  # noqa: E402


def features(model, tokens: torch.Tensor, blocks: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = heldout_blocks(tokens, blocks, block)
    k = model.patch_size
    hidden, first = [], []
    with torch.no_grad():
        for batch in ids.split(8):
            hidden.append(model.backbone_hidden(batch)[:, :-1].flatten(0, 1))
            first.append(batch.reshape(batch.shape[0], -1, k)[:, 1:, 0].flatten())
    return torch.cat(hidden), torch.cat(first)


def metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    p = logits.softmax(-1)
    brier = 2 * p.gather(1, target[:, None]).squeeze(1) - p.pow(2).sum(-1)
    return {"ce": F.cross_entropy(logits, target).item(), "acc": (logits.argmax(-1) == target).float().mean().item(),
            "brier1": brier.mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("data", type=Path, help="prepared data directory (train.bin, heldout.bin)")
    ap.add_argument("--train-blocks", type=int, default=240)
    ap.add_argument("--heldout-blocks", type=int, default=64)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = load_model(args.model).float().eval()
    train = torch.from_numpy(np.fromfile(args.data / "train.bin", dtype=np.uint16).astype(np.int64))
    heldout = torch.from_numpy(np.fromfile(args.data / "heldout.bin", dtype=np.uint16).astype(np.int64))
    x, y = features(model, train[: args.train_blocks * args.block * 2], args.train_blocks, args.block)
    hx, hy = features(model, heldout, args.heldout_blocks, args.block)

    counts = torch.bincount(train, minlength=model.config.vocab_size).float() + 0.5
    print(json.dumps({"probe": "unigram", **metrics(counts.log().expand(len(hy), -1), hy)}))
    probe = torch.nn.Linear(x.shape[1], model.config.vocab_size)
    opt = torch.optim.Adam(probe.parameters(), lr=3e-3)
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(y)).split(1024):
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            print(json.dumps({"probe": "linear", "epoch": epoch, "positions": len(y), **metrics(probe(hx), hy)}))


if __name__ == "__main__":
    main()
