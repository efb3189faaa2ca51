"""BrierLM from two model samples per position: a likelihood-free score for any language model.

For the next-n-token event with truth y, 1{x1 = y} + 1{x2 = y} - 1{x1 = x2} over two
independent samples x1, x2 has expectation 2P(y) - sum_x P(x)^2, the Brier score (higher
is better, at most 1). BrierLM = 100 x the geometric mean of Brier-1..4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def brier_from_samples(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, max_n: int = 4) -> dict[str, float]:
    """Mean Brier-n estimates for token continuations [..., W] (two samples and the truth).

    Brier-n compares the first n tokens (n = 1..min(max_n, W)); `count` is the number of
    positions averaged, so results of several batches can be combined by weighted mean.
    `brierlm` is present only when all of Brier-1..4 are.
    """
    if not (x1.shape == x2.shape == y.shape):
        raise ValueError(f"sample and truth shapes differ: {list(x1.shape)}, {list(x2.shape)}, {list(y.shape)}")
    width = min(max_n, y.shape[-1])
    # Prefix equality: the first n tokens all agree <=> cumulative product of per-token equality.
    def prefix_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a == b).reshape(-1, a.shape[-1])[:, :width].long().cumprod(-1)

    hit1, hit2, collide = prefix_equal(x1, y), prefix_equal(x2, y), prefix_equal(x1, x2)
    score = (hit1 + hit2 - collide).double().mean(0)
    result = {f"brier{n}": score[n - 1].item() for n in range(1, width + 1)}
    result["count"] = float(hit1.shape[0])
    if width >= 4:
        result["brierlm"] = brier_lm([result[f"brier{n}"] for n in range(1, 5)])
    return result


def brier_lm(briers: Sequence[float]) -> float:
    """100 x geometric mean of Brier-1..4; any non-positive Brier-n makes it 0 (no sign games)."""
    if min(briers) <= 0:
        return 0.0
    return 100.0 * math.prod(briers) ** (1.0 / len(briers))
