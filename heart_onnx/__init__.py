"""heart-onnx: Hessian-guided pruning of ViTs, CNNs and LLMs, applied to ONNX by graph surgery.

    import heart_onnx as ho
    sens = ho.analyze(model, calib, targets=("heads", "tokens", "pairs"))
    plan = ho.plan(sens, budget=0.05)
    ho.export(model, example_inputs, "model.onnx")
    ho.prune("model.onnx", plan, "model.pruned.onnx")
    ho.verify("model.pruned.onnx", model, plan, inputs)
    ho.benchmark("model.pruned.onnx", backend="ort-cpu")

Heavy modules load on first use, so ``import heart_onnx`` stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import HeartError, MissingDependency, PlanMismatch, UnsupportedGraph
from .plan import Plan, TokenStage, WeightMerge

__version__ = "0.1.0"

# public name -> "module:attribute", resolved lazily
_LAZY = {
    "analyze": "heart_onnx.sensitivity.api:analyze",
    "Sensitivities": "heart_onnx.sensitivities:Sensitivities",
    "pareto": "heart_onnx.budget:pareto",
    "export": "heart_onnx.models.export:export",
    "adapt": "heart_onnx.models.registry:adapt",
    "inspect": "heart_onnx.inspect:inspect",
    "prune": "heart_onnx.surgery.api:prune",
    "calibrate": "heart_onnx.budget:calibrate",
    "predict": "heart_onnx.budget:predict",
    "calibrate_on_data": "heart_onnx.calibration:calibrate_on_data",
    "CompareResult": "heart_onnx.verify:CompareResult",
    "finetune": "heart_onnx.finetune:finetune",
    "verify": "heart_onnx.verify:verify",
    "apply_plan": "heart_onnx.models.masking:apply_plan",
    "benchmark": "heart_onnx.runtime.api:benchmark",
}



def plan(sens, budget, *args, **kwargs):  # noqa: F811 - the function shadows the heart_onnx.plan module name
    """The plan that maximises FLOPs saved within ``budget`` nats (see :func:`heart_onnx.budget.plan`)."""
    from .budget import plan as _plan

    return _plan(sens, budget, *args, **kwargs)


__all__ = ["plan", "HeartError", "MissingDependency", "PlanMismatch", "UnsupportedGraph", "Plan", "TokenStage", "WeightMerge", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'heart_onnx' has no attribute {name!r}")
    mod, attr = target.split(":")
    value = getattr(importlib.import_module(mod), attr)
    globals()[name] = value
    return value
