"""Shared benchmark helpers: interleaved latency timing and result files."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any


from onnxcomp.runtime import interleaved_latency_ms  # noqa: F401 - the suites time models with it

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__, "python": platform.python_version()}


def write_results(suite: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write results/SUITE.json (with the machine description) and results/SUITE.md."""
    RESULTS.mkdir(exist_ok=True)
    payload = {"suite": suite, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **data}
    json_path, md_path = RESULTS / f"{suite}.json", RESULTS / f"{suite}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    m = payload["machine"]
    header = f"<!-- made by `python -m benchmarks.run {suite}` on {payload['date']}; {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']} -->\n"
    md_path.write_text(header + markdown.rstrip() + "\n")
    return json_path, md_path


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def available_entries(names: str):
    """(name, zoo entry) for each comma-separated model name whose files are at hand; the others
    are reported as skipped with their reason."""
    from models import zoo

    for name in names.split(","):
        entry = zoo.get(name)
        ok, why = entry.available()
        if ok:
            yield name, entry
        else:
            print(f"{name}: skipped ({why})")
