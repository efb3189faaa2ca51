"""BrierLM from two model samples per position: a likelihood-free score for any language model.

For the next-n-token event with truth y, 1{x1 = y} + 1{x2 = y} - 1{x1 = x2} over two
independent samples x1, x2 has expectation 2P(y) - sum_x P(x)^2, the Brier score (higher
is better, at most 1). BrierLM = 100 x the geometric mean of Brier-1..4.

This module is the one place the formula lives: `brier_per_position` is 2 x (an estimate
of P(y)) - (an estimate of the collision probability), whatever produced the estimates
(two samples here and in training; exact probabilities for token-level models in
`evaluate`), and `brier_lm_rows` turns Brier-1..4 into BrierLM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def prefix_match(a: torch.Tensor, b: torch.Tensor, width: int) -> torch.Tensor:
    """[P, width] 0/1: whether the first n tokens of a and b ([..., >= width]) all agree, n = 1..width."""
    return (a == b).reshape(-1, a.shape[-1])[:, :width].long().cumprod(-1)


def brier_per_position(accuracy: torch.Tensor, collision: torch.Tensor) -> torch.Tensor:
    """Per-position Brier-n, 2 * accuracy - collision, from unbiased estimates of P(y) and sum_x P(x)^2."""
    return 2 * accuracy.double() - collision.double()


def brier_from_samples(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, max_n: int = 4) -> dict[str, float]:
    """Mean Brier-n estimates for token continuations [..., W] (two samples and the truth).

    Brier-n compares the first n tokens (n = 1..min(max_n, W)); `count` is the number of
    positions averaged, so results of several batches can be combined by weighted mean.
    `brierlm` is present only when all of Brier-1..4 are.
    """
    if not (x1.shape == x2.shape == y.shape):
        raise ValueError(f"sample and truth shapes differ: {list(x1.shape)}, {list(x2.shape)}, {list(y.shape)}")
    width = min(max_n, y.shape[-1])
    hits = (prefix_match(x1, y, width) + prefix_match(x2, y, width)) / 2
    score = brier_per_position(hits, prefix_match(x1, x2, width)).mean(0)
    result = {f"brier{n}": score[n - 1].item() for n in range(1, width + 1)}
    result["count"] = float(hits.shape[0])
    if width >= 4:
        result["brierlm"] = brier_lm([result[f"brier{n}"] for n in range(1, 5)])
    return result


def brier_lm_rows(briers: torch.Tensor) -> torch.Tensor:
    """BrierLM of each row of Brier-1..4 [..., 4]: 100 x geometric mean, 0 when any is <= 0 (no sign games)."""
    briers = briers.double()
    positive = (briers > 0).all(-1)
    geomean = briers.clamp_min(torch.finfo(torch.float64).tiny).log().mean(-1).exp()
    return torch.where(positive, 100.0 * geomean, torch.zeros_like(geomean))


def brier_lm(briers: Sequence[float]) -> float:
    """100 x geometric mean of Brier-1..4; any non-positive Brier-n makes it 0."""
    return brier_lm_rows(torch.tensor([float(b) for b in briers], dtype=torch.float64)).item()
