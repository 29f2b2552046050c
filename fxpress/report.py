"""The compile report: what each pass changed, how long it took, bytes before and after."""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from typing import Any


def stopwatch() -> Any:
    """lap(name) records the seconds since the previous lap under `name` in lap.times (stage times in stats)."""
    last = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        lap.times[name] = round(now - last[0], 3)
        last[0] = now

    lap.times = {}
    return lap


@dataclass
class PassResult:
    """What one pass did: the report row the manager prints and saves."""

    name: str
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0
    warnings: list[str] = field(default_factory=list)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_stats(stats: dict[str, Any], limit: int = 6) -> str:
    parts = []
    for key, value in stats.items():
        if isinstance(value, (dict, list)):
            continue
        parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts[:limit])


class Report:
    """A list of PassResults that prints as a table and serialises to JSON."""

    def __init__(self, results: list[PassResult]):
        self.results = results

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, key: int | str) -> PassResult:
        if isinstance(key, str):
            for r in self.results:
                if r.name == key:
                    return r
            raise KeyError(f"no pass named '{key}' in this report")
        return self.results[key]

    def to_dict(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.results]

    def table(self):
        from rich.table import Table

        table = Table(title="fxpress compile report")
        for column in ("pass", "seconds", "weights before", "weights after", "what changed"):
            table.add_column(column)
        for r in self.results:
            table.add_row(r.name, f"{r.seconds:.2f}", _fmt_bytes(r.bytes_before), _fmt_bytes(r.bytes_after), _fmt_stats(r.stats))
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=140, record=True, file=io.StringIO())
        console.print(self.table())
        text = console.export_text()
        warnings = [f"warning [{r.name}]: {w}" for r in self.results for w in r.warnings]
        return text + ("\n".join(warnings) + "\n" if warnings else "")

    __repr__ = __str__
