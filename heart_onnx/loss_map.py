"""Monotone map from the planner's raw predicted loss change to the measured one (log-log interpolation).

Numpy only. Built from measured points ``(raw_i, measured_i)`` (raw: the planner's prediction of a plan on
its Pareto curve; measured: the real KL of that plan on calibration data), the map is:

- between the points: piecewise linear in ``(log raw, log measured)`` (a local power law), so it is
  exact at the measured points (when those increase with ``raw``);
- beyond the ends: power laws ``m = m_end * (raw / raw_end) ** slope`` with the slope of a least-squares
  line through the 3 points nearest that end (clamped to [``MIN_SLOPE``, ``MAX_SLOPE``]; 1 with a single
  point: a pure factor);
- ``0 -> 0``, strictly increasing, hence invertible (:meth:`LossMap.inverse` maps a budget in measured
  nats back to the raw scale).

Noisy measurements need not increase with ``raw``: they are first made non-decreasing by isotonic
regression (pool adjacent violators, in log space, equal weights), then strictly increasing by a
relative step of ``1e-6`` between tied points. ``to_dict``/``from_dict`` give the JSON stored in
``Sensitivities.meta["calibration"]["curves"]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import HeartError

MIN_SLOPE = 0.25
MAX_SLOPE = 4.0
_TIE = 1e-6  # relative step between pooled (tied) points


def _isotonic(y: np.ndarray) -> np.ndarray:
    """Non-decreasing least-squares fit of ``y`` (pool adjacent violators, equal weights)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in y.tolist():
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, n2 = blocks.pop()
            m1, n1 = blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return np.concatenate([np.full(int(n), m) for m, n in blocks])


def _end_slope(lx: np.ndarray, ly: np.ndarray) -> float:
    if len(lx) < 2 or np.ptp(lx) <= 1e-12:
        return 1.0
    g = float(np.polyfit(lx, ly, 1)[0])
    return float(min(max(g, MIN_SLOPE), MAX_SLOPE))


@dataclass(frozen=True)
class LossMap:
    """Strictly increasing map raw -> measured nats; ``raw``/``fitted`` (n,) are the knots (log-log linear
    between them), ``slope_lo``/``slope_hi`` the power-law exponents beyond the ends."""

    raw: np.ndarray
    fitted: np.ndarray
    slope_lo: float = 1.0
    slope_hi: float = 1.0
    measured: np.ndarray | None = None  # the measurements as given (before the monotone fit), for reports

    @classmethod
    def fit(cls, raw: Sequence[float], measured: Sequence[float]) -> "LossMap":
        """The map through the points ``(raw_i, measured_i)`` (both > 0; others are dropped)."""
        r = np.asarray(raw, dtype=np.float64).reshape(-1)
        m = np.asarray(measured, dtype=np.float64).reshape(-1)
        if r.shape != m.shape:
            raise HeartError(f"loss map needs as many raw predictions as measurements, got {r.shape[0]} and {m.shape[0]}")
        ok = np.isfinite(r) & np.isfinite(m) & (r > 0) & (m > 0)
        r, m = r[ok], m[ok]
        if len(r) == 0:
            raise HeartError("a loss map needs at least one plan with a positive prediction and a positive measured loss change")
        order = np.argsort(r, kind="stable")
        r, m = r[order], m[order]
        lx, ly = np.log(r), np.log(m)
        # equal raw predictions: one knot at their mean measurement (log)
        ux, inv = np.unique(lx, return_inverse=True)
        uy = np.bincount(inv, weights=ly) / np.bincount(inv)
        fy = _isotonic(uy)
        fy = fy + np.arange(len(fy)) * _TIE  # strictly increasing (ties step by a relative 1e-6)
        k = min(3, len(ux))
        lo = _end_slope(ux[:k], fy[:k])
        hi = _end_slope(ux[-k:], fy[-k:])
        return cls(raw=np.exp(ux), fitted=np.exp(fy), slope_lo=lo, slope_hi=hi, measured=m)

    def __call__(self, x: Any) -> Any:
        """Measured-scale prediction of raw prediction(s) ``x`` (scalar or array; ``x <= 0`` -> 0)."""
        arr = np.asarray(x, dtype=np.float64)
        out = np.zeros_like(arr)
        pos = arr > 0
        if np.any(pos):
            lx = np.log(arr[pos])
            kx, ky = np.log(self.raw), np.log(self.fitted)
            ly = np.interp(lx, kx, ky)
            below, above = lx < kx[0], lx > kx[-1]
            ly = np.where(below, ky[0] + self.slope_lo * (lx - kx[0]), ly)
            ly = np.where(above, ky[-1] + self.slope_hi * (lx - kx[-1]), ly)
            out[pos] = np.exp(ly)
        return float(out) if out.ndim == 0 else out

    def inverse(self, y: Any) -> Any:
        """The raw prediction whose mapped value is ``y`` (scalar or array; ``y <= 0`` -> 0; inf -> inf)."""
        arr = np.asarray(y, dtype=np.float64)
        out = np.where(np.isposinf(arr), np.inf, 0.0)
        pos = (arr > 0) & np.isfinite(arr)
        if np.any(pos):
            ly = np.log(arr[pos])
            kx, ky = np.log(self.raw), np.log(self.fitted)
            lx = np.interp(ly, ky, kx)
            lx = np.where(ly < ky[0], kx[0] + (ly - ky[0]) / self.slope_lo, lx)
            lx = np.where(ly > ky[-1], kx[-1] + (ly - ky[-1]) / self.slope_hi, lx)
            out[pos] = np.exp(lx)
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (lists of floats)."""
        d: dict[str, Any] = {"raw": self.raw.tolist(), "fitted": self.fitted.tolist(),
                             "slope_lo": self.slope_lo, "slope_hi": self.slope_hi, "n": int(len(self.raw))}
        if self.measured is not None:
            d["measured"] = np.asarray(self.measured).tolist()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LossMap":
        """Inverse of :meth:`to_dict`; HeartError if the knots are not strictly increasing and positive."""
        try:
            raw = np.asarray(d["raw"], dtype=np.float64).reshape(-1)
            fitted = np.asarray(d["fitted"], dtype=np.float64).reshape(-1)
            lo, hi = float(d.get("slope_lo", 1.0)), float(d.get("slope_hi", 1.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise HeartError(f"calibration curve is malformed ({exc}): re-run the calibration") from None
        if (len(raw) == 0 or raw.shape != fitted.shape or np.any(raw <= 0) or np.any(fitted <= 0)
                or np.any(np.diff(raw) <= 0) or np.any(np.diff(fitted) <= 0) or not (lo > 0 and hi > 0)
                or not all(math.isfinite(v) for v in (*raw, *fitted, lo, hi))):
            raise HeartError("calibration curve is not strictly increasing and positive: re-run the calibration")
        meas = d.get("measured")
        return cls(raw=raw, fitted=fitted, slope_lo=lo, slope_hi=hi,
                   measured=None if meas is None else np.asarray(meas, dtype=np.float64))


__all__ = ["LossMap", "MIN_SLOPE", "MAX_SLOPE"]
