"""One JSON schema for every benchmark, so results from different runs and machines compare.

Each benchmark writes:

    {"benchmark": NAME, "unit": UNIT, "higher_is_better": BOOL,
     "load": {"others_cpu_share": SHARE, "busy": BOOL},
     "contenders": [{"contender": NAME, "median": X, "ratio": X / BASELINE, "baseline": NAME,
                     "samples": [...], "warmup_samples": N, ...}, ...],
     "checks": [{"check": TEXT, "value": X, "target": TEXT, "met": BOOL}, ...],
     "details": {...}}

`median` leaves out the warm-up samples (compilation, first allocations); `ratio` divides it
by the baseline contender's median, in the benchmark's own unit.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from machine_load import BUSY_SHARE


@dataclasses.dataclass
class Contender:
    """One contender's repeated measurements; the median after warm-up is its figure."""

    name: str
    samples: list[float]
    baseline: Contender | None = None  # None: this contender is the baseline
    warmup: int = 0                    # leading samples left out of the median
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples[self.warmup:])

    @property
    def ratio(self) -> float:
        return self.median / (self.baseline or self).median

    def to_json(self) -> dict[str, Any]:
        return {"contender": self.name, "median": self.median, "ratio": self.ratio,
                "baseline": (self.baseline or self).name, "samples": self.samples,
                "warmup_samples": self.warmup, **self.extra}


@dataclasses.dataclass
class Check:
    """A target the benchmark is held to, such as "framework / hand-written jax <= 1.1"."""

    check: str
    value: float
    at_most: float | None = None
    at_least: float | None = None

    @property
    def target(self) -> str:
        bounds = [f"<= {self.at_most}" if self.at_most is not None else "",
                  f">= {self.at_least}" if self.at_least is not None else ""]
        return " and ".join(b for b in bounds if b)

    @property
    def met(self) -> bool:
        return ((self.at_most is None or self.value <= self.at_most)
                and (self.at_least is None or self.value >= self.at_least))

    def line(self) -> str:
        return (f"{self.check}: {self.value:.2f}x (target {self.target}) "
                f"{'met' if self.met else 'NOT MET'}")


def write_results(path: Path, benchmark: str, unit: str, *, higher_is_better: bool,
                  contenders: list[Contender], others_cpu_share: float | None,
                  checks: list[Check] = (), details: dict[str, Any] | None = None) -> None:
    """Writes the schema above to `path`, creating its folder."""
    busy = others_cpu_share is not None and others_cpu_share > BUSY_SHARE
    payload = {
        "benchmark": benchmark, "unit": unit, "higher_is_better": higher_is_better,
        "load": {"others_cpu_share": others_cpu_share, "busy": busy},
        "contenders": [c.to_json() for c in contenders],
        "checks": [{"check": c.check, "value": c.value, "target": c.target, "met": c.met}
                   for c in checks],
        "details": details or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
