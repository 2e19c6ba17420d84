"""The plan a pruned ONNX file was made with, stored in its ``metadata_props`` (no torch).

Key ``heart_onnx.plan``: the plan's JSON (``Plan.to_json``, merge arrays excluded; they are applied
to the weights already). onnx-graphsurgeon drops ``metadata_props`` on a round trip, so surgery
copies the input's properties back and then records the plan with :func:`set_plan`.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from ..errors import HeartError
from ..plan import Plan

PLAN_KEY = "heart_onnx.plan"
PRUNED_KEY = "heart_onnx.pruned"


def set_props(model: Any, props: Mapping[str, str]) -> Any:
    """Set (add or replace) ``metadata_props`` entries of an ``onnx.ModelProto`` in place; returns it."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for k, v in keep + [(k, str(v)) for k, v in props.items()]:
        model.metadata_props.add(key=k, value=v)
    return model


def get_props(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def set_plan(model: Any, plan: Plan) -> Any:
    """Record ``plan`` (JSON) under ``heart_onnx.plan`` and ``heart_onnx.pruned = "1"``."""
    return set_props(model, {PLAN_KEY: plan.to_json(), PRUNED_KEY: "1"})


def get_plan_dict(model: Any) -> dict[str, Any] | None:
    """The recorded plan as a dict (merge arrays not included), or None when the model has none."""
    raw = get_props(model).get(PLAN_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise HeartError(f"the model's {PLAN_KEY} metadata is not valid JSON ({exc.msg}): re-run 'heart-onnx prune'") from None
