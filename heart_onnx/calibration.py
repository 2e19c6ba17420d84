"""Calibrate the planner's predictions against measured loss changes on the calibration data.

Second-order scores rank components well but, summed, they under-predict what removing many
components at once costs (interactions; on the demo ViT heads by 2-5x and token groups by one to two
orders of magnitude). So, before planning, we *measure* the real loss change (KL against the dense
model, by masking) of a few plans spread along each target's own Pareto curve, on calibration inputs
(never the held-out split), and fit ``budget.calibrate``'s per-target model ``c * x**g`` to them.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def measured_kl(model: Any, plan: Any, x: Any, dense_logits: Any) -> float:
    """Mean KL(dense || plan applied by masking) over the inputs ``x``, nats."""
    import torch
    import torch.nn.functional as F

    from .models.masking import apply_plan

    with torch.no_grad(), apply_plan(model, plan) as masked:
        logits = masked.forward(x)  # (B, C)
    return float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(dense_logits, -1), log_target=True,
                          reduction="batchmean"))


def calibrate_on_data(model: Any, sens: Any, x: Any, targets: Sequence[str] = ("heads", "tokens"),
                      points: int = 6, calibration_model: str = "power") -> dict[str, Any]:
    """Measure ``points`` plans per target along its curve on inputs ``x`` and store the fit in ``sens.meta``.

    Options (defaults): ``targets=("heads", "tokens")``; ``points=6`` per target, spread evenly in
    predicted loss over the curve's points; ``calibration_model="power"`` (see ``budget.calibrate``).
    Returns the calibration dict with the measurements added under ``"points"``.
    """
    import torch

    from .budget import calibrate, pareto

    sens.meta.pop("calibration", None)
    with torch.no_grad():
        dense = model(x)
    measured = []
    for target in targets:
        curve = pareto(sens, [target])
        n = len(curve)
        if n < 2:
            continue
        for i in sorted(set(np.linspace(1, n - 1, points).round().astype(int).tolist())):
            plan = curve.to_plan(float(curve.loss[i]) * (1 + 1e-9) + 1e-15)
            if plan.is_empty:
                continue
            measured.append((plan, measured_kl(model, plan, x, dense)))
    cal = calibrate(sens, measured, model=calibration_model)
    cal = dict(cal)
    cal["points"] = [{"predicted_uncalibrated": float(p.predicted_loss_change or 0.0), "measured": m} for p, m in measured]
    sens.meta["calibration_points"] = cal["points"]
    return cal
