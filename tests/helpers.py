"""Running the real `calm` entry point in a subprocess; probes of what a decode holds in memory and reads back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def calm_command() -> list[str]:
    script = Path(sys.executable).parent / "calm"
    if script.exists():
        return [str(script)]
    found = shutil.which("calm")
    return [found] if found else [sys.executable, "-m", "calm_cli"]


def run_calm(*args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        calm_command() + list(args), input=input if input is not None else "", capture_output=True, text=True,
        env=full_env, timeout=timeout,
    )


def decode_all(engine, prompts: list[list[int]], settings) -> list[list[int]]:
    """Submit every prompt to `engine` (one settings, or one per prompt) and step it until all are done."""
    per_row = settings if isinstance(settings, list) else [settings] * len(prompts)
    requests = [engine.submit(p, s) for p, s in zip(prompts, per_row)]
    for _ in engine.run():
        pass
    return [r.tokens for r in requests]


class LogitProbe(TorchDispatchMode):
    """Records the largest new matrix with `vocab` as its last dimension (logits) and how many operations made one.

    Views (the output matrix transposed, for one) hold no memory of their own and are left out.
    """

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest, self.made = vocab, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.is_mutable or any(r.alias_info for r in func._schema.returns):
            return out
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor) and value.dim() > 1 and value.shape[-1] == self.vocab:
                self.largest = max(self.largest, value.numel())
                self.made += 1
        return out


aten = torch.ops.aten
READS_BACK = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default}


class HostReads(TorchDispatchMode):
    """Names the operations that make the host wait for a CUDA device: what torch.cuda.set_sync_debug_mode reports.

    On the CPU nothing waits, but the same operations run: a value read back (.item(), int(),
    bool()), nonzero and boolean-mask indexing (the result's size depends on the data).
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masks = [i for i in (args[1] if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) else [])
                 if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
        if func in READS_BACK or masks:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))
