"""The per-pass report: what each pass changed and cost, as a rich table or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PassRecord:
    spec: str
    lossless: bool
    status: str  # "ok", "unchanged", "rolled back", "failed"
    changed: bool
    seconds: float
    before: dict[str, int]
    after: dict[str, int]
    stats: dict[str, Any] = field(default_factory=dict)
    verification: str = ""
    message: str = ""
    weights_changed: bool | None = None  # lossy passes: did it make any weight the model lacked before?


@dataclass
class Report:
    pipeline: str
    input: dict[str, int] = field(default_factory=dict)
    output: dict[str, int] = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None  # the accuracy gate: its verdict and the path taken
    seconds: float = 0.0

    @property
    def failed(self) -> list[PassRecord]:
        return [p for p in self.passes if p.status in ("rolled back", "failed")]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_jsonable)

    def write(self, path: str | Path) -> Path:
        """Write the report as JSON (any suffix but .html) atomically."""
        from onnxcomp.files import atomic_write_text

        return atomic_write_text(Path(path), self.to_json() + "\n")

    def table(self):
        """A rich Table: one row per pass, then the total."""
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=escape(f"onnxcomp: {self.pipeline}"), title_justify="left")
        for col in ("pass", "status", "nodes", "initializers", "param bytes", "time", "details"):
            table.add_column(col, justify="right" if col in ("nodes", "initializers", "param bytes", "time") else "left")
        for rec in self.passes:
            details = ", ".join(f"{k}={_short(v)}" for k, v in rec.stats.items() if not isinstance(v, (dict, list)))
            if rec.verification:
                details = (details + "; " if details else "") + rec.verification
            if rec.message:
                details = (details + "; " if details else "") + rec.message
            table.add_row(escape(rec.spec), rec.status, _delta(rec.before["nodes"], rec.after["nodes"]),
                          _delta(rec.before["initializers"], rec.after["initializers"]),
                          _delta(rec.before["param_bytes"], rec.after["param_bytes"]),
                          f"{rec.seconds:.2f}s", escape(details))
        if self.input and self.output:
            table.add_row("[bold]total", "", _delta(self.input["nodes"], self.output["nodes"]),
                          _delta(self.input["initializers"], self.output["initializers"]),
                          _delta(self.input["param_bytes"], self.output["param_bytes"]), f"{self.seconds:.2f}s", "")
        return table


def _delta(before: int, after: int) -> str:
    return f"{before:,}" if before == after else f"{before:,} → {after:,}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _jsonable(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
