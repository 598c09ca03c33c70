"""Pieces every benchmark script shares: the machine's name and result tables."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown_table(rows: list[dict], cols: list[str], header: str = "") -> str:
    """A markdown table of ``rows`` over ``cols`` (floats to 4 significant digits), under ``header``."""
    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ([header, ""] if header else []) + ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save_results(stem: str, header: str, rows: list[dict], cols: list[str]) -> str:
    """Write bench/results/<stem>.json (header + rows) and <stem>.md (the table); returns the table."""
    import json

    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    table = markdown_table(rows, cols, header)
    (results / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    (results / f"{stem}.md").write_text(table)
    return table
