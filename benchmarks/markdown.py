"""Replace one marked section of BENCHMARKS.md, leaving the others as they are."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(name: str, body: str, path: Path = BENCHMARKS) -> Path:
    """Put ``body`` between the section's markers (appending the section when absent)."""
    start, end = markers(name)
    text = f"{start}\n{body.strip()}\n{end}"
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + text + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new, encoding="utf-8")
    return path


def run_context(load_before: float) -> dict[str, str]:
    """When and where a benchmark ran, for its section's first line: date, machine, load average."""
    return {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}",
        "load": f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after",
    }
