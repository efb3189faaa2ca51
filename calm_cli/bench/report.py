"""Printing a `calm bench` report as a rich table, Markdown or CSV (JSON is the report dict itself)."""

from __future__ import annotations

import csv
import io
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

Row = dict[str, Any]


def _pm(mean: float, std: float, digits: int = 1) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _bandwidth(r: Row) -> str:
    frac = r.get("bandwidth_frac")
    return f"{r['bandwidth_gbs']:.2f}" + (f" ({frac:.0%})" if frac is not None else "")


def _speedup(r: Row) -> str:
    value = r.get("speedup_vs_baseline")
    return f"{value:.2f}x" if value is not None else "-"


COLUMNS: list[tuple[str, Callable[[Row], str]]] = [
    ("kind", lambda r: r["kind"]),
    ("K", lambda r: str(r["K"])),
    ("batch", lambda r: str(r["batch"])),
    ("T", lambda r: f"{r['temp']:g}"),
    ("compiled", lambda r: "yes" if r.get("compile") else "no"),
    ("decoder", lambda r: r.get("candidate_decoder") or "-"),
    ("cand. dtype", lambda r: r.get("candidate_dtype") or "-"),
    ("decodes/step", lambda r: f"{r['decodes_per_step']:.1f}" if r.get("decodes_per_step") is not None else "-"),
    ("prefill tok/s", lambda r: _pm(r["prefill_tok_s"], r["prefill_tok_s_std"], 0)),
    ("decode tok/s", lambda r: _pm(r["decode_tok_s"], r["decode_tok_s_std"])),
    ("vector-steps/s", lambda r: _pm(r["vector_steps_s"], r["vector_steps_s_std"])),
    ("TTFT ms", lambda r: _pm(r["ttft_ms"], r["ttft_ms_std"])),
    ("step ms p50/p95", lambda r: f"{r['step_ms_p50']:.2f}/{r['step_ms_p95']:.2f}"),
    ("peak MB", lambda r: f"{r['peak_mem_mb']:.0f}"),
    ("GB/s", _bandwidth),
    ("vs baseline", _speedup),
]


def summary(report: dict[str, Any]) -> str:
    """One line on what was measured and where; model build/load times, which the rows exclude."""
    loads = ", ".join(f"{m['kind']} K={m['K']} {m['load_s']:.2f}s" for m in report["models"])
    return (
        f"{report['source']} · {report['hardware']} · {report['device']} {report['dtype']} · "
        f"{report['threads']} threads · "
        f"compile {'on' if report['compile'] else 'off'} · {report['repetitions']} runs after warm-up · "
        f"peak memory: {report['peak_mem_kind']} · load (not timed in rows): {loads}"
    )


def render_table(report: dict[str, Any], console: Console) -> None:
    table = Table(caption=summary(report), caption_justify="left")
    for name, _ in COLUMNS:
        table.add_column(name, justify="left" if name == "kind" else "right")
    for r in report["rows"]:
        table.add_row(*(cell(r) for _, cell in COLUMNS))
    console.print(table)


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r) for _, cell in COLUMNS) + " |" for r in report["rows"]]
    return "\n".join(lines) + f"\n\n{summary(report)}\n"


def to_csv(report: dict[str, Any]) -> str:
    """Every field of any row, in order of first appearance (only CALM rows have speedup_vs_baseline)."""
    fields = list(dict.fromkeys(key for r in report["rows"] for key in r))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(report["rows"])
    return out.getvalue()
