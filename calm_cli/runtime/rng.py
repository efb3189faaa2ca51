"""Random numbers per request, independent of the batch: a counter-based generator on the device.

A request's output must depend only on its prompt, settings and seed, whether it decodes
alone or beside others. One torch.Generator per batch cannot give that (rows share its
stream), and one generator per row needs a Python loop per draw. Here every row has a
64-bit key made from its seed and a counter of the calls it took part in; value j of a
call is splitmix64(base + j * golden) with base = splitmix64(key + counter * golden), all
in int64 tensor arithmetic (wrapping multiplication), so a draw for any set of rows is a
handful of element-wise kernels with no host synchronisation, and a row's numbers depend
on its own key and history only.
"""

from __future__ import annotations

import secrets

import torch
from torch import Tensor


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 that has its bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN = _signed(0x9E3779B97F4A7C15)
MIX1 = _signed(0xBF58476D1CE4E5B9)
MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's >> keeps the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: Tensor) -> Tensor:
    """splitmix64's finaliser: a bijection on 64-bit words that spreads every input bit."""
    z = (z ^ _shift_right(z, 30)) * MIX1
    z = (z ^ _shift_right(z, 27)) * MIX2
    return z ^ _shift_right(z, 31)


def new_seed() -> int:
    """A seed for a request that gave none, from the OS (never from torch's global generator)."""
    return secrets.randbits(63)


class RowRandom:
    """Uniform numbers for a set of rows, each from its own stream.

    `rows(index)` gives a view on some rows that shares (and advances) their counters, so
    a sampler that keeps drawing for the rows still pending gets the same numbers for a
    row whatever the other rows did.
    """

    def __init__(self, keys: Tensor, counters: Tensor, index: Tensor | None = None) -> None:
        self.keys, self.counters, self.index = keys, counters, index

    @classmethod
    def from_seeds(cls, seeds: list[int], device: torch.device | str = "cpu") -> RowRandom:
        keys = mix64(torch.tensor(seeds, dtype=torch.long, device=device))
        return cls(keys, torch.zeros(len(seeds), dtype=torch.long, device=device))

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def __len__(self) -> int:
        return len(self.keys) if self.index is None else len(self.index)

    def rows(self, index: Tensor) -> RowRandom:
        """The rows `index` (of this view) as a view of their own."""
        index = index.to(self.device)
        return RowRandom(self.keys, self.counters, index if self.index is None else self.index[index])

    def bits(self, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """Random int64 words of `shape` (its first dimension is the rows); advances each row's counter by one."""
        keys = self.keys if self.index is None else self.keys[self.index]
        counters = self.counters if self.index is None else self.counters[self.index]
        if len(shape) == 0 or shape[0] != len(keys):
            raise ValueError(f"shape {tuple(shape)} must start with the {len(keys)} rows")
        base = mix64(keys + counters * GOLDEN)
        per_row = 1
        for size in shape[1:]:
            per_row *= size
        j = torch.arange(1, per_row + 1, dtype=torch.long, device=self.device)
        words = mix64(base[:, None] + j[None, :] * GOLDEN)
        if self.index is None:
            self.counters += 1
        else:
            self.counters[self.index] += 1
        return words.reshape(shape)

    def uniform(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float64) -> Tensor:
        """Uniforms in (0, 1) from the top 52 bits: never exactly 0 or 1, so logs stay finite."""
        top = _shift_right(self.bits(shape), 12).to(torch.float64)
        return ((top + 0.5) * 2.0**-52).to(dtype)
