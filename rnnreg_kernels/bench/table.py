"""Result rows -> text: the short terminal table and markdown tables (used by report.py)."""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

COLUMNS = ("shape", "dtype", "mode", "contender", "median ms", "min-max ms", "us/step",
           "tok/s", "speedup", "peak MB", "status")


def _f(v: Optional[float], digits: int = 3) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _tokens(v: Optional[float]) -> str:
    if v is None:
        return "-"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def row_cells(row: dict) -> List[str]:
    """The table cells of one result row (see ``COLUMNS``)."""
    t = row.get("time_ms") or {}
    mem = row.get("memory") or {}
    status = row["status"]
    if status in ("wrong", "unavailable", "error", "skipped") and row.get("reason"):
        status = f"{status}: {row['reason']}"
    tf32 = row.get("tf32")
    dtype = row["dtype"] + ("+tf32" if tf32 and any(tf32.values()) else "")
    speed = row.get("speedup")
    return [row["shape"]["name"], dtype, row["mode"], row["contender"], _f(t.get("median")),
            f"{_f(t.get('min'))}-{_f(t.get('max'))}" if t else "-",
            _f(row.get("us_per_step")), _tokens(row.get("tokens_per_s")),
            f"{speed:.2f}x" if speed is not None else "-", _f(mem.get("step_peak_mb")),
            status]


SHORT = ("shape", "dtype", "mode", "contender", "median ms", "speedup", "status")


def text_table(rows: Iterable[dict], max_status: int = 60,
               columns: Sequence[str] = COLUMNS) -> str:
    """A fixed-width table for the terminal (``columns``: a subset of ``COLUMNS``)."""
    idx = [COLUMNS.index(c) for c in columns]
    cells = [list(columns)]
    for r in rows:
        c = row_cells(r)
        c[-1] = c[-1] if len(c[-1]) <= max_status else c[-1][:max_status - 3] + "..."
        cells.append([c[i] for i in idx])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    numeric = {j for j, i in enumerate(idx) if i in (4, 5, 6, 7, 8, 9)}
    lines = []
    for k, r in enumerate(cells):
        parts = [r[i].rjust(widths[i]) if i in numeric and k else r[i].ljust(widths[i])
                 for i in range(len(r))]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Iterable[dict], columns: Sequence[str] = COLUMNS) -> str:
    """A GitHub markdown table of the rows (status reasons shortened to one line)."""
    idx = [COLUMNS.index(c) for c in columns]
    out = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---:" if i in (4, 5, 6, 7, 8, 9) else "---" for i in idx) + "|"]
    for r in rows:
        c = row_cells(r)
        out.append("| " + " | ".join(c[i].replace("|", "\\|")[:120] for i in idx) + " |")
    return "\n".join(out)


def pivot_table(rows: Iterable[dict]) -> str:
    """Markdown, one line per (shape, dtype, mode): the baseline's median and every other
    contender's median with its speedup (or its status when it was not timed)."""
    cases: dict = {}
    contenders: List[str] = []
    for r in rows:
        key = (r["shape"]["name"], r["dtype"], r["mode"])
        cases.setdefault(key, {})[r["contender"]] = r
        if r["contender"] not in contenders:
            contenders.append(r["contender"])
    base = "nn+eager"
    others = [c for c in contenders if c != base]
    out = ["| shape | dtype | mode | nn+eager ms | " + " | ".join(others) + " |",
           "|---|---|---|---:|" + "---:|" * len(others)]
    for (shape, dtype, mode), by in cases.items():
        cells = [shape, dtype, mode, _cell(by.get(base), with_speedup=False)]
        cells += [_cell(by.get(c)) for c in others]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _cell(row: Optional[dict], with_speedup: bool = True) -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    text = _f(row["time_ms"]["median"])
    if with_speedup and row.get("speedup") is not None:
        text += f" ({row['speedup']:.2f}x)"
    return text
