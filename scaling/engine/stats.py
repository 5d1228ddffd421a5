"""Counters and latency histograms the engine keeps, for the front end to publish.

Histograms have fixed bucket bounds, as Prometheus histograms do, so that a scraper can add
them up across servers; the bounds span a fast accelerator's milliseconds to a loaded CPU's
seconds.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses

LATENCY_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)


class Histogram:
    """Observations counted into buckets by upper bound, with their sum."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BOUNDS_S):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last bucket is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or under it), ending with +Inf."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclasses.dataclass
class Stats:
    requests_received: int = 0
    requests_finished: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)  # by finish reason
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_steps: int = 0
    prefill_tokens: int = 0  # prompt tokens computed (those found in the prefix cache are not)
    decode_steps: int = 0
    # The decode loop's host time (building steps, reading tokens, stop checks, text,
    # events) and the time it waited for the device's tokens, in seconds.
    decode_host_seconds: float = 0.0
    decode_wait_seconds: float = 0.0
    preemptions: int = 0  # running requests sent back to the queue for their blocks
    peak_running: int = 0  # the most requests decoding in one step
    step_errors: int = 0  # steps that raised; their requests ended with finish_reason=error
    time_to_first_token: Histogram = dataclasses.field(default_factory=Histogram)
    inter_token_latency: Histogram = dataclasses.field(default_factory=Histogram)
