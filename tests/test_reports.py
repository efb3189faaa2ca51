"""What `calm bench` and `calm eval` print for a person: a table that fits, spreads only when measured, and warnings."""

from __future__ import annotations

import io

from rich.console import Console

from calm_cli.bench.report import (
    VARIATION_LIMIT,
    render_table,
    to_csv,
    to_markdown,
    variation_warnings,
)
from calm_cli.eval.evaluate import FEW_DOCUMENTS, format_report, report_notes


def _row(kind: str, batch: int, tok_s: float, std: float) -> dict:
    return {
        "kind": kind, "K": 1 if kind == "baseline" else 4, "batch": batch, "temp": 1.0,
        "candidate_decoder": None if kind == "baseline" else "fast", "decodes_per_step": None if kind == "baseline" else 1.0,
        "prefill_tok_s": 123456.7, "prefill_tok_s_std": 1234.5, "decode_tok_s": tok_s, "decode_tok_s_std": std,
        "vector_steps_s": tok_s / 4, "vector_steps_s_std": std / 4, "ttft_ms": 48.25, "ttft_ms_std": 1.5,
        "step_ms_p50": 6.02, "step_ms_p95": 6.29, "peak_mem_mb": 3390.0, "bandwidth_gbs": 6.45, "bandwidth_frac": 0.25,
        "speedup_vs_baseline": None if kind == "baseline" else 1.88,
    }


def _report(repetitions: int, rows: list[dict]) -> dict:
    return {
        "source": "/home/someone/models/a-rather-long-model-directory-name", "hardware": "AMD EPYC 9654 96-Core (192 logical CPUs)",
        "device": "cpu", "dtype": "float32", "threads": 1, "compile": False, "repetitions": repetitions,
        "peak_mem_kind": "rss_high_water_per_row", "models": [{"kind": "calm", "K": 4, "load_s": 0.08}], "rows": rows,
    }


def _render(report: dict, width: int, wide: bool = False) -> str:
    out = io.StringIO()
    render_table(report, Console(file=out, width=width, highlight=False, color_system=None), wide=wide)
    return out.getvalue()


def test_default_table_fits_100_columns_without_cutting_cells():
    rows = [_row("baseline", 32, 12345.6, 10.0), _row("calm", 32, 23456.7, 20.0)]
    text = _render(_report(3, rows), 100)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "…" not in text and "vs base" in text and "1.88x" in text and "23456.7" in text and "3390" in text
    wide = _render(_report(3, rows), 220, wide=True)
    assert "vs baseline" in wide and "123457 ± 1234" in wide and "6.45 (25%)" in wide


def test_one_run_has_no_spread():
    rows = [_row("baseline", 1, 300.0, 0.0), _row("calm", 1, 400.0, 0.0)]
    for text in (_render(_report(1, rows), 220, wide=True), to_markdown(_report(1, rows))):
        assert "±" not in text and "1 timed run " in text
    assert "± 0.0" in to_markdown(_report(2, rows))


def test_csv_keeps_every_field():
    header = to_csv(_report(2, [_row("calm", 1, 400.0, 1.0)])).splitlines()[0].split(",")
    assert {"decode_tok_s_std", "bandwidth_gbs", "prefill_tok_s"} <= set(header)


def test_variation_warning_names_the_row_over_the_limit():
    steady, noisy = _row("baseline", 1, 300.0, 300.0 * VARIATION_LIMIT / 2), _row("calm", 8, 400.0, 400.0 * VARIATION_LIMIT * 2)
    warnings = variation_warnings(_report(3, [steady, noisy]))
    assert len(warnings) == 1 and "calm K=4 batch 8" in warnings[0] and "±20%" in warnings[0]
    assert variation_warnings(_report(1, [noisy])) == []


def _eval_report(briers: list[float], brierlm: float, ci: list, documents: int) -> dict:
    return {
        **{f"brier{n}": b for n, b in enumerate(briers, 1)}, "brierlm": brierlm, "brierlm_ci95": ci,
        "positions": 40, "documents": documents, "k": 4, "estimator": "two samples", "seconds": 1.0,
    }


def test_floored_brierlm_says_which_brier_n_and_why():
    text = format_report(_eval_report([-0.01, 0.2, 0.1, 0.05], 0.0, [0.0, 0.0], 3))
    assert "BrierLM  0.00" in text and "floored at 0 because Brier-1 = -0.0100" in text
    assert "only 3 documents" in text and str(FEW_DOCUMENTS) in text


def test_wide_interval_warns_and_a_good_report_is_quiet():
    assert any("interval" in n for n in report_notes(_eval_report([0.5, 0.4, 0.3, 0.2], 30.0, [10.0, 50.0], 500)))
    assert report_notes(_eval_report([0.5, 0.4, 0.3, 0.2], 30.0, [29.0, 31.0], 500)) == []
