"""A FLOPs target instead of a loss budget: the plan on a method's own Pareto curve that reaches it.

Numpy + stdlib only, built on :func:`heart_onnx.budget.pareto` (same greedy, same FLOPs model, same token
rule). The curve's points are the plans ``actions[:i]``; the plan for a target reduction ``r`` is the
point with the MOST effective FLOPs among those with ``flops <= (1 - r) * flops_dense``: the least pruning
(hence, along the greedy, the least predicted loss) that saves at least ``r`` of the dense FLOPs.

Because the choice reads only the curve's FLOPs, the scores' units do not matter: it works for Hessian
sensitivities (nats) and for baselines whose scores are rankings (magnitude, random, class-token attention).

    plan = plan_for_flops(sens, 0.4, targets=["heads", "tokens"])   # >= 40% fewer FLOPs
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .budget import MAX_BUDGET, Pareto, pareto
from .errors import HeartError
from .plan import Plan


def _check_reduction(reduction: Any) -> float:
    try:
        r = float(reduction)
    except (TypeError, ValueError):
        raise HeartError(f"FLOPs reduction must be a fraction in [0, 1) (e.g. 0.4 for 40% fewer FLOPs), got {reduction!r}") from None
    if not np.isfinite(r) or not 0.0 <= r < 1.0:
        raise HeartError(f"FLOPs reduction {reduction!r} is out of range: give a fraction in [0, 1) (e.g. 0.4 for 40% fewer FLOPs)")
    return r


def index_for_flops(curve: Pareto, reduction: float) -> int:
    """Index of the curve point with the most FLOPs among those saving at least ``reduction`` of the dense
    FLOPs; HeartError if no point saves that much (the curve's largest saving is in the message)."""
    r = _check_reduction(reduction)
    limit = (1.0 - r) * curve.flops_dense
    ok = np.nonzero(curve.flops <= limit * (1 + 1e-12))[0]
    if not len(ok):
        raise HeartError(f"no plan on this curve saves {100 * r:.1f}% of the FLOPs (at most {100 * float(curve.saved.max()):.1f}%): "
                         "add targets (heads, tokens) or lower min_keep / min_heads")
    return int(ok[np.argmax(curve.flops[ok])])


def plan_at(curve: Pareto, index: int) -> Plan:
    """The plan of curve point ``index`` (``actions[:index]``), with ``notes["pareto_index"]``; its ``budget`` is
    the point's predicted loss when that is a valid budget in nats, else None."""
    if not 0 <= index < len(curve):
        raise HeartError(f"curve point {index} does not exist: the curve has points 0..{len(curve) - 1}")
    prob = curve._problem
    prob.replay(curve.actions[:index])
    loss = float(curve.loss[index])
    return prob.current_plan(loss if 0.0 <= loss <= MAX_BUDGET else None, index)


def plan_for_flops(sens: Any, reduction: float, targets: Sequence[str] | str | None = None, *, curve: Pareto | None = None,
                   **kw: Any) -> Plan:
    """The plan saving at least ``reduction`` (a fraction, e.g. 0.4) of the dense FLOPs with the most FLOPs left.

    ``targets`` as :func:`heart_onnx.budget.pareto` (default None: every target the sensitivities have);
    ``curve`` (default None) reuses a curve computed with the same options; ``**kw`` goes to ``pareto``
    (``scorer``, ``fuse_dropped``, ``token_layers``, ``min_keep``, ...). ``notes`` record ``flops_target``
    (the requested reduction) next to the achieved ``reduction``.
    """
    r = _check_reduction(reduction)
    if curve is None:
        curve = pareto(sens, targets, **kw)
    p = plan_at(curve, index_for_flops(curve, r))
    return p.replace(notes={**dict(p.notes), "flops_target": r})


__all__ = ["plan_for_flops", "index_for_flops", "plan_at"]
