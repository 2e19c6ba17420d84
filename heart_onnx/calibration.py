"""Calibrate the planner's predictions against measured loss changes on the calibration data.

Second-order scores rank components well but, summed, they under-predict what removing many
components at once costs (interactions; on the demo ViT heads by 2-5x and token groups by one to two
orders of magnitude, and heads x tokens interact again in mixed plans). So, before planning, we
*measure* the real loss change (KL against the dense model, by masking) of plans on the calibration
inputs and fit the two stages of ``heart_onnx.budget``'s calibration (its module docstring):

1. ``points`` plans along each target's own Pareto curve -> per-target power law ``c * x**g``
   (:func:`heart_onnx.budget.calibrate`, ``model="power"``): the exchange rate between targets the
   greedy walks with;
2. for each target set the planner may be asked for (every non-empty subset of ``targets``: the Jupyter
   tuner toggles them), ``points`` plans along *that set's* curve (stage 1 applied), plus bisection
   where neighbouring measurements jump by more than ``max_gap`` -> a monotone log-log
   :class:`heart_onnx.loss_map.LossMap` (:func:`heart_onnx.budget.calibrate_curve`).

Stage-2 points are spread evenly in log predicted loss over ``[lo, hi]`` (defaults 1e-3 .. 1 nats, the
range budgets are given in; the curve's own end if it is shorter), so each budget in that range lies
between two measured plans. The calibration inputs must be exchangeable with the deployment data:
never images the model was trained on (it is over-confident there: the demo ViT's held-out loss
changes were 4-6x those measured on its training images) and never the held-out split.
"""
from __future__ import annotations

from itertools import combinations
from typing import Any, Sequence

import numpy as np


def measured_kl(model: Any, plan: Any, x: Any, dense_logits: Any, batch_size: int = 512) -> float:
    """Mean KL(dense || plan applied by masking) over the inputs ``x``, nats (``batch_size`` default 512)."""
    import torch
    import torch.nn.functional as F

    from .models.masking import apply_plan

    total = 0.0
    with torch.no_grad(), apply_plan(model, plan) as masked:
        for i in range(0, len(x), batch_size):
            logits = masked.forward(x[i:i + batch_size])  # (B, C)
            total += float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(dense_logits[i:i + batch_size], -1),
                                    log_target=True, reduction="sum"))
    return total / max(len(x), 1)


def curve_points(curve: Any, points: int, lo: float = 1e-3, hi: float = 1.0) -> list[int]:
    """Indices of ``points`` curve points spread evenly in log predicted loss over ``[lo, min(hi, end)]``
    (defaults 1e-3 .. 1 nats): for each grid value the last point at or below it (distinct, non-dense)."""
    loss = np.asarray(curve.loss, dtype=np.float64)
    pos = np.nonzero(loss > 0)[0]
    if len(pos) == 0 or points < 1:
        return []
    top = min(hi, float(loss[pos].max()))
    bottom = min(lo, top)
    grid = np.geomspace(bottom, top, points) if points > 1 and top > bottom else np.array([top])
    out = set()
    for g in grid:
        ok = pos[loss[pos] <= g * (1 + 1e-9)]
        out.add(int(ok[np.argmax(loss[ok])]) if len(ok) else int(pos[np.argmin(loss[pos])]))
    return sorted(out)


def _plan_at(curve: Any, i: int) -> Any:
    return curve.to_plan(float(curve.loss[i]) * (1 + 1e-9) + 1e-15)


def _measure_refined(curve: Any, start: Sequence[int], measure: Any, max_gap: float, max_extra: int) -> dict[int, float]:
    """Measure the curve points ``start``, then bisect between neighbours whose measurements differ by more than
    a factor ``max_gap`` while curve points lie between them (at most ``max_extra`` more measurements): a
    jump in the curve (one step that costs much more than predicted) gets a knot on each side of it, so the
    log-log interpolation never spreads it over the plans before it. Returns ``{index: measured}`` (sorted)."""
    got: dict[int, float] = {}
    for i in start:
        plan = _plan_at(curve, i)
        if not plan.is_empty:
            got[i] = measure(plan)
    extra = 0
    while extra < max_extra:
        ks = sorted(got)
        gaps = [(a, b) for a, b in zip(ks, ks[1:]) if b - a > 1 and got[b] > max_gap * max(got[a], 1e-12)]
        if not gaps:
            break
        for a, b in gaps:
            if extra >= max_extra:
                break
            mid = (a + b) // 2
            got[mid] = measure(_plan_at(curve, mid))
            extra += 1
    return {i: got[i] for i in sorted(got)}


def calibrate_on_data(model: Any, sens: Any, x: Any, targets: Sequence[str] = ("heads", "tokens"),
                      points: int = 12, calibration_model: str = "power", sets: Sequence[Sequence[str]] | None = None,
                      lo: float = 1e-3, hi: float = 1.0, max_gap: float = 1.5) -> dict[str, Any]:
    """Measure plans on inputs ``x`` and store both calibration stages in ``sens.meta["calibration"]``.

    Options (defaults): ``targets=("heads", "tokens")``; ``points=12`` measured plans per curve (stage 1: per
    target; stage 2: per target set), spread by :func:`curve_points` over ``[lo, hi] = [1e-3, 1]`` nats
    (on the demo ViT, without the bisection below, the map's own mean error on the calibration images was
    19-34% with 4 points, 8-13% with 8, 6-8% with 12, 4-5% with 24; with it, 1-6% from 4 points up, max
    1.1-1.3x, while val -> held-out sampling noise is 15-35%: ``benchmarks/budget_accuracy.py --points-sweep``);
    ``calibration_model="power"`` for stage 1 (see ``budget.calibrate``); ``sets`` the target sets that get
    a stage-2 curve (default None: every non-empty subset of ``targets``); ``max_gap=1.5``: stage-2 knots whose
    measurements differ by more than this factor are bisected (up to ``2 * points`` more plans per curve,
    :func:`_measure_refined`). Returns the calibration dict with
    the stage-1 measurements under ``"points"`` and the stage-2 ones inside ``"curves"``; ``x`` must be
    calibration data, not training or held-out data (module docstring).
    """
    import torch

    from .budget import calibrate, calibrate_curve, pareto, target_key

    sens.meta.pop("calibration", None)
    with torch.no_grad():
        dense = model(x)  # (B, C)
    # ---- stage 1: each target alone, uncalibrated curve
    measured = []
    for target in targets:
        curve = pareto(sens, [target])
        for i in curve_points(curve, points, lo, hi):
            plan = _plan_at(curve, i)
            if not plan.is_empty:
                measured.append((plan, measured_kl(model, plan, x, dense)))
    cal = dict(calibrate(sens, measured, model=calibration_model))
    pts = [{"predicted_uncalibrated": float(p.predicted_loss_change or 0.0), "measured": m} for p, m in measured]
    # ---- stage 2: each target set's own curve, stage 1 applied
    if sets is None:
        sets = [c for r in range(1, len(targets) + 1) for c in combinations(targets, r)]
    curves: dict[str, Any] = {}
    for ts in sets:
        curve = pareto(sens, list(ts))  # no stage-2 curve for this set yet: loss is the stage-1 prediction
        got = _measure_refined(curve, curve_points(curve, points, lo, hi), lambda p: measured_kl(model, p, x, dense),
                               max_gap, 2 * points)
        raw = [float(curve.loss[i]) for i in got]
        meas = [got[i] for i in got]
        if raw and max(meas) > 0:
            curves[target_key(ts)] = calibrate_curve(sens, ts, raw, meas).to_dict()
    cal = dict(sens.meta["calibration"])
    cal["points"] = pts
    sens.meta["calibration_points"] = pts
    return cal


__all__ = ["measured_kl", "curve_points", "calibrate_on_data"]
