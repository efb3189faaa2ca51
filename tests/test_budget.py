"""The per-device logit budget: slices that cover every row, and decodes in slices that equal the whole-pool decode."""

from __future__ import annotations

import subprocess
import sys

import torch
import torch.nn.functional as F
from helpers import LogitProbe

from calm_cli.runtime import budget
from calm_cli.runtime.budget import logit_budget, logit_elements, row_slices, rows_per_slice
from calm_cli.runtime.fastdecode import dense_argmax


def test_the_budget_module_prices_without_torch() -> None:
    code = "import sys, calm_cli.runtime.budget as b; b.row_slices(8, 3, 'cuda'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_budgets_per_device() -> None:
    assert logit_budget("cpu") == 1 << 25 and logit_budget("cuda") == 1 << 26
    assert logit_budget("mps") == logit_budget("cpu")  # any other device gets the CPU's
    assert rows_per_slice(128256, "cuda") == 523 and rows_per_slice(128256, "cpu") == 261
    assert rows_per_slice(1 << 30, "cpu") == 1  # a row larger than the budget still gets decoded, alone
    assert logit_elements(64, 200, 4, 128256) == 64 * 200 * 4 * 128256


def test_row_slices_cover_every_row_once_within_the_budget(monkeypatch) -> None:
    monkeypatch.setitem(budget.LOGIT_BUDGET, "cpu", 1000)
    slices = list(row_slices(10, 300, "cpu"))
    assert [(s.start, s.stop) for s in slices] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert list(row_slices(0, 300, "cpu")) == []
    assert len(list(row_slices(10, 300, "cuda"))) == 1


def test_sliced_dense_argmax_is_bit_identical_to_the_whole_pool(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(700, 64, generator=generator), torch.randn(1999, 64, generator=generator)
    whole = F.linear(hidden, weight).argmax(-1)
    monkeypatch.setitem(budget.LOGIT_BUDGET, "cpu", 16 * 1999)
    with LogitProbe(1999) as probe:
        sliced = dense_argmax(hidden, weight)
    assert torch.equal(sliced, whole)
    assert probe.largest == 16 * 1999 and probe.made == -(-700 // 16)  # 44 slices of at most 16 rows
    assert dense_argmax(hidden[:0], weight).shape == (0,)
