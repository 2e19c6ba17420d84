"""Output comparison: an object that is truthy on pass and tells max/mean absolute and relative error.

    res = compare_outputs(onnx_outs, torch_outs, atol=1e-4, rtol=1e-3)
    assert res, res   # str(res) is a one-line report

Pass rule (numpy ``allclose``): every element satisfies ``|a - e| <= atol + rtol * |e|``.
Relative error is ``|a - e| / max(|e|, eps)`` with ``eps = 1e-12`` (reported, not used to decide).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class OutputDiff:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    passed: bool
    message: str = ""


@dataclass(frozen=True)
class CompareResult:
    """Truthy when every output passes. ``outputs`` has one ``OutputDiff`` per compared tensor."""

    passed: bool
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    atol: float
    rtol: float
    outputs: list[OutputDiff] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        bad = [o.name + (f" ({o.message})" if o.message else "") for o in self.outputs if not o.passed]
        status = "PASS" if self.passed else "FAIL " + ", ".join(bad)
        return (f"{status}: max_abs={self.max_abs:.3g} mean_abs={self.mean_abs:.3g} max_rel={self.max_rel:.3g} "
                f"mean_rel={self.mean_rel:.3g} (atol={self.atol:g}, rtol={self.rtol:g}, {len(self.outputs)} outputs)")

    def to_dict(self) -> dict:
        return {
            "passed": self.passed, "max_abs": self.max_abs, "mean_abs": self.mean_abs, "max_rel": self.max_rel,
            "mean_rel": self.mean_rel, "atol": self.atol, "rtol": self.rtol,
            "outputs": [o.__dict__ for o in self.outputs],
        }


def _as_named(x, names: Sequence[str] | None) -> dict[str, np.ndarray]:
    if isinstance(x, Mapping):
        return {k: np.asarray(_np(v)) for k, v in x.items()}
    if not isinstance(x, (list, tuple)):
        x = [x]
    names = list(names) if names else [f"output{i}" for i in range(len(x))]
    return {n: np.asarray(_np(v)) for n, v in zip(names, x)}


def _np(v):
    if hasattr(v, "detach"):  # torch tensor, without importing torch
        return v.detach().cpu().numpy()
    return v


def compare_outputs(actual, expected, atol: float = 1e-4, rtol: float = 1e-3, names: Sequence[str] | None = None) -> CompareResult:
    """Compare two sets of outputs (dicts by name, sequences by position, or single arrays).

    ``atol`` default 1e-4, ``rtol`` default 1e-3. Missing outputs and shape mismatches fail.
    """
    a = _as_named(actual, names)
    e = _as_named(expected, names)
    diffs: list[OutputDiff] = []
    for name in e:
        if name not in a:
            diffs.append(OutputDiff(name, tuple(e[name].shape), np.inf, np.inf, np.inf, np.inf, False, "missing"))
            continue
        x, y = a[name].astype(np.float64), e[name].astype(np.float64)
        if x.shape != y.shape:
            diffs.append(OutputDiff(name, tuple(y.shape), np.inf, np.inf, np.inf, np.inf, False, f"shape {x.shape} != {y.shape}"))
            continue
        if x.size == 0:
            diffs.append(OutputDiff(name, tuple(y.shape), 0.0, 0.0, 0.0, 0.0, True))
            continue
        d = np.abs(x - y)
        rel = d / np.maximum(np.abs(y), 1e-12)
        nonfinite = bool((~np.isfinite(x)).any() and not np.array_equal(np.isfinite(x), np.isfinite(y)))
        ok = bool(np.allclose(x, y, atol=atol, rtol=rtol, equal_nan=True)) and not nonfinite
        diffs.append(OutputDiff(name, tuple(y.shape), float(np.nanmax(d)), float(np.nanmean(d)), float(np.nanmax(rel)),
                                float(np.nanmean(rel)), ok, "" if ok else "exceeds tolerance"))
    finite = [o for o in diffs if np.isfinite(o.max_abs)]
    agg = lambda attr, f: float(f([getattr(o, attr) for o in diffs])) if diffs else 0.0  # noqa: E731
    return CompareResult(
        passed=bool(diffs) and all(o.passed for o in diffs),
        max_abs=agg("max_abs", np.max), mean_abs=float(np.mean([o.mean_abs for o in finite])) if finite else float("inf"),
        max_rel=agg("max_rel", np.max), mean_rel=float(np.mean([o.mean_rel for o in finite])) if finite else float("inf"),
        atol=atol, rtol=rtol, outputs=diffs,
    )
