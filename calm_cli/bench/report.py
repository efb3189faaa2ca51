"""Printing a `calm bench` report as a rich table, Markdown or CSV (JSON is the report dict itself).

The default table keeps the columns a reader compares (tokens/s, latency, memory, speedup)
and fits 100 columns; `wide=True` and Markdown show every column. A spread (±) appears only
when there was more than one timed run.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

Row = dict[str, Any]


VARIATION_LIMIT = 0.10  # warn when a row's decode tok/s varies across runs by more than this fraction of its mean


def _pm(mean: float, std: float, digits: int = 1, runs: int = 2) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if runs > 1 else f"{mean:.{digits}f}"


def _bandwidth(r: Row) -> str:
    frac = r.get("bandwidth_frac")
    return f"{r['bandwidth_gbs']:.2f}" + (f" ({frac:.0%})" if frac is not None else "")


def _variant(r: Row) -> str:
    """Candidate decoder and dtype, and whether the step was compiled, in a few characters: "fast bf16 +c"."""
    dtype = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(r.get("candidate_dtype") or "", r.get("candidate_dtype") or "")
    parts = [r.get("candidate_decoder") or "-", dtype, "+c" if r.get("compile") else ""]
    return " ".join(part for part in parts if part)


def _speedup(r: Row) -> str:
    value = r.get("speedup_vs_baseline")
    return f"{value:.2f}x" if value is not None else "-"


Column = tuple[str, Callable[[Row, int], str]]

WIDE: list[Column] = [
    ("kind", lambda r, n: r["kind"]),
    ("K", lambda r, n: str(r["K"])),
    ("batch", lambda r, n: str(r["batch"])),
    ("T", lambda r, n: f"{r['temp']:g}"),
    ("compiled", lambda r, n: "yes" if r.get("compile") else "no"),
    ("decoder", lambda r, n: r.get("candidate_decoder") or "-"),
    ("cand. dtype", lambda r, n: r.get("candidate_dtype") or "-"),
    ("decodes/step", lambda r, n: f"{r['decodes_per_step']:.1f}" if r.get("decodes_per_step") is not None else "-"),
    ("prefill tok/s", lambda r, n: _pm(r["prefill_tok_s"], r["prefill_tok_s_std"], 0, n)),
    ("decode tok/s", lambda r, n: _pm(r["decode_tok_s"], r["decode_tok_s_std"], 1, n)),
    ("vector-steps/s", lambda r, n: _pm(r["vector_steps_s"], r["vector_steps_s_std"], 1, n)),
    ("TTFT ms", lambda r, n: _pm(r["ttft_ms"], r["ttft_ms_std"], 1, n)),
    ("step ms p50/p95", lambda r, n: f"{r['step_ms_p50']:.2f}/{r['step_ms_p95']:.2f}"),
    ("peak MB", lambda r, n: f"{r['peak_mem_mb']:.0f}"),
    ("GB/s", lambda r, n: _bandwidth(r)),
    ("vs baseline", lambda r, n: _speedup(r)),
]
NARROW: list[Column] = [
    ("kind", lambda r, n: r["kind"]),
    ("K", lambda r, n: str(r["K"])),
    ("batch", lambda r, n: str(r["batch"])),
    ("T", lambda r, n: f"{r['temp']:g}"),
    ("decoder", lambda r, n: _variant(r)),
    ("tok/s", lambda r, n: f"{r['decode_tok_s']:.1f}"),
    ("steps/s", lambda r, n: f"{r['vector_steps_s']:.1f}"),
    ("TTFT ms", lambda r, n: f"{r['ttft_ms']:.1f}"),
    ("step ms", lambda r, n: f"{r['step_ms_p50']:.2f}"),
    ("peak MB", lambda r, n: f"{r['peak_mem_mb']:.0f}"),
    ("vs base", lambda r, n: _speedup(r)),
]
NARROW_NOTE = (
    "decoder: candidate decoder, candidate dtype, +c when compiled · tok/s: decode tokens/s (mean of runs) · "
    "steps/s: vector steps/s · step ms: median · vs base: speedup over the baseline"
)


def summary(report: dict[str, Any]) -> str:
    """One line on what was measured and where; model build/load times, which the rows exclude."""
    loads = ", ".join(f"{m['kind']} K={m['K']} {m['load_s']:.2f}s" for m in report["models"])
    why = f" ({report['threads_reason']})" if report.get("threads_reason") else ""  # set by `calm bench`, not by run_bench
    return (
        f"{report['source']} · {report['hardware']} · {report['device']} {report['dtype']} · "
        f"{report['threads']} thread{'s' * (report['threads'] != 1)}{why} · "
        f"compile {'on' if report['compile'] else 'off'} · {_runs(report['repetitions'])} after warm-up · "
        f"peak memory: {report['peak_mem_kind']} · load (not timed in rows): {loads}"
    )


def _runs(n: int) -> str:
    return f"{n} timed run{'s' * (n != 1)}"


def render_table(report: dict[str, Any], console: Console, wide: bool = False) -> None:
    """The rich table: NARROW columns (fits 100 columns) or, with `wide`, every column."""
    columns, runs = (WIDE if wide else NARROW), report["repetitions"]
    caption = summary(report) if wide else f"{NARROW_NOTE}\n{summary(report)}"
    table = Table(caption=caption, caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, _ in columns:
        table.add_column(name, justify="left" if name in ("kind", "decoder") else "right", no_wrap=True)
    for r in report["rows"]:
        table.add_row(*(cell(r, runs) for _, cell in columns))
    console.print(table)


def variation_warnings(report: dict[str, Any], limit: float = VARIATION_LIMIT) -> list[str]:
    """One line per row whose decode tok/s spread (std / mean) across the timed runs exceeds `limit`."""
    if report["repetitions"] < 2:
        return []
    out = []
    for r in report["rows"]:
        mean, std = r["decode_tok_s"], r["decode_tok_s_std"]
        if mean and std / mean > limit:
            out.append(
                f"{r['kind']} K={r['K']} batch {r['batch']} T={r['temp']:g}: decode tok/s varied by ±{std / mean:.0%} "
                f"across {_runs(report['repetitions'])} (over {limit:.0%}); is the machine busy? (try more -r, or --threads)"
            )
    return out


def to_markdown(report: dict[str, Any]) -> str:
    runs = report["repetitions"]
    lines = ["| " + " | ".join(name for name, _ in WIDE) + " |", "|" + "---|" * len(WIDE)]
    lines += ["| " + " | ".join(cell(r, runs) for _, cell in WIDE) + " |" for r in report["rows"]]
    return "\n".join(lines) + f"\n\n{summary(report)}\n"


def to_csv(report: dict[str, Any]) -> str:
    """Every field of any row, in order of first appearance (only CALM rows have speedup_vs_baseline)."""
    fields = list(dict.fromkeys(key for r in report["rows"] for key in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(report["rows"])
    return out.getvalue()
