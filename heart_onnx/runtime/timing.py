"""One timing protocol for every backend: warm-up, synchronisation, repeats, percentiles, throughput.

    t = time_fn(lambda: runner.infer(feed), warmup=10, repeats=50, sync=runner.sync, batch=4)
    t.median_ms, t.p90_ms, t.p99_ms, t.throughput   # items/s = batch / mean latency

Every call is timed on its own (``time.perf_counter`` around ``fn(); sync()``), so the median is
robust to the occasional hiccup of a shared machine. ``interleaved`` times several functions in a
round-robin (A B A B ...) so that slow drifts (thermal throttling, other processes) hit all of them
equally: speed ratios are measured side by side, never across runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import HeartError


@dataclass
class Timing:
    """Per-call latencies (ms) and their summary; ``windows`` are (start, end) perf_counter pairs."""

    latencies_ms: list[float]
    batch: int = 1
    warmup: int = 0
    windows: list[tuple[float, float]] = field(default_factory=list, repr=False)

    @property
    def repeats(self) -> int:
        return len(self.latencies_ms)

    def _pct(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies_ms), q))

    @property
    def median_ms(self) -> float:
        return self._pct(50)

    @property
    def p90_ms(self) -> float:
        return self._pct(90)

    @property
    def p99_ms(self) -> float:
        return self._pct(99)

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.latencies_ms))

    @property
    def min_ms(self) -> float:
        return float(np.min(self.latencies_ms))

    @property
    def max_ms(self) -> float:
        return float(np.max(self.latencies_ms))

    @property
    def std_ms(self) -> float:
        return float(np.std(self.latencies_ms))

    @property
    def throughput(self) -> float:
        """Items per second: ``batch * repeats / total timed seconds``."""
        total_s = sum(self.latencies_ms) / 1e3
        return self.batch * self.repeats / total_s if total_s > 0 else float("inf")

    @property
    def start(self) -> float:
        return self.windows[0][0] if self.windows else 0.0

    @property
    def end(self) -> float:
        return self.windows[-1][1] if self.windows else 0.0

    def summary(self) -> dict:
        return {
            "median_ms": self.median_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms, "mean_ms": self.mean_ms,
            "min_ms": self.min_ms, "max_ms": self.max_ms, "std_ms": self.std_ms, "throughput_per_s": self.throughput,
            "batch": self.batch, "warmup": self.warmup, "repeats": self.repeats,
        }

    def to_dict(self, with_samples: bool = False) -> dict:
        d = self.summary()
        if with_samples:
            d["latencies_ms"] = list(self.latencies_ms)
        return d


def _check(warmup: int, repeats: int) -> None:
    if warmup < 0:
        raise HeartError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise HeartError(f"repeats must be >= 1, got {repeats}")


def time_fn(
    fn: Callable[[], object],
    *,
    warmup: int = 10,
    repeats: int = 50,
    sync: Callable[[], None] | None = None,
    batch: int = 1,
) -> Timing:
    """Time ``fn`` ``repeats`` times after ``warmup`` untimed calls (defaults 10 and 50).

    ``sync`` (default none) is called after every call inside the timed region, e.g.
    ``torch.cuda.synchronize`` for asynchronous devices. ``batch`` (default 1) scales throughput.
    """
    _check(warmup, repeats)
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    lat: list[float] = []
    windows: list[tuple[float, float]] = []
    clock = time.perf_counter
    for _ in range(repeats):
        t0 = clock()
        fn()
        if sync:
            sync()
        t1 = clock()
        lat.append((t1 - t0) * 1e3)
        windows.append((t0, t1))
    return Timing(lat, batch=batch, warmup=warmup, windows=windows)


def interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 10,
    repeats: int = 50,
    sync: Callable[[], None] | None = None,
    batch: int = 1,
) -> dict[str, Timing]:
    """Time several functions round-robin (A B C A B C ...); same options as ``time_fn``."""
    _check(warmup, repeats)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
            if sync:
                sync()
    lat: dict[str, list[float]] = {n: [] for n in names}
    win: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    clock = time.perf_counter
    for i in range(repeats):
        order = names if i % 2 == 0 else names[::-1]  # alternate order: no systematic first/second bias
        for n in order:
            t0 = clock()
            fns[n]()
            if sync:
                sync()
            t1 = clock()
            lat[n].append((t1 - t0) * 1e3)
            win[n].append((t0, t1))
    return {n: Timing(lat[n], batch=batch, warmup=warmup, windows=win[n]) for n in names}

