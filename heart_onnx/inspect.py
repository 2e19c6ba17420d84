"""What is in an ONNX file: I/O, opset, exporter, parameters, FLOPs by op, attention blocks, stored plan.

    info = inspect("model.onnx")          # a JSON-able dict
    print(format_table(info))

Keys: ``path, opset, ir_version, producer, exporter, inputs, outputs`` (each ``{name, dtype, shape}``,
symbolic dims as strings), ``params, int_constants, flops`` (``{total, mac_flops, elementwise,
by_op, assumptions, unknown}``), ``macs, attention_macs, attention`` (list of ``{layer, heads,
head_dim, seq_len, layout}``), ``attention_error`` (why matching failed, else None), ``metadata``
(``metadata_props``) and ``plan`` (the JSON stored under metadata key ``heart_onnx.plan``, else None).
External weight data is not read (only checked to exist), so inspecting a 5 GB model is quick.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import HeartError, UnsupportedGraph

PLAN_KEY = "heart_onnx.plan"


def _dtype_name(elem_type: int) -> str:
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type{elem_type}"


def _io(values: Any, skip: set[str]) -> list[dict[str, Any]]:
    out = []
    for vi in values:
        if vi.name in skip:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        out.append({"name": vi.name, "dtype": _dtype_name(tt.elem_type), "shape": shape})
    return out


def inspect(path: str | os.PathLike, dims: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Summary of the ONNX file at ``path`` (see the module docstring for the keys).

    - ``dims``: default None; symbolic input dims for the FLOPs count (others are taken as 1).
    Raises ``HeartError`` for a missing, non-ONNX, truncated or invalid file.
    """
    from .graph_flops import graph_flops
    from .onnx_io import load_model
    from .surgery.match import detect_exporter, find_attention_blocks, import_graph

    p = Path(os.fspath(path))
    model = load_model(p, load_external=False)
    inits = {t.name for t in model.graph.initializer}
    meta = {m.key: m.value for m in model.metadata_props}
    plan = None
    if PLAN_KEY in meta:
        try:
            plan = json.loads(meta[PLAN_KEY])
        except json.JSONDecodeError as exc:
            plan = {"error": f"metadata {PLAN_KEY} is not valid JSON ({exc.msg})"}
    try:
        shapes: dict = {}
        rep = graph_flops(model, dims=dims, base_dir=str(p.parent), shapes_out=shapes)
    except (ValueError, KeyError, IndexError, TypeError, RecursionError) as exc:
        raise HeartError(f"cannot count FLOPs of {p} ({type(exc).__name__}: {exc})") from None
    attention: list[dict[str, Any]] = []
    error = None
    try:
        graph = import_graph(model, base_dir=str(p.parent), shapes=shapes or None)
        attention = [b.summary() for b in find_attention_blocks(graph)]
    except UnsupportedGraph as exc:
        error = str(exc)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as exc:
        error = f"could not match attention blocks ({type(exc).__name__}: {exc})"
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "path": str(p),
        "opset": opset,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "exporter": detect_exporter(model),
        "inputs": _io(model.graph.input, inits),
        "outputs": _io(model.graph.output, set()),
        "nodes": len(model.graph.node),
        "params": rep.params,
        "int_constants": rep.int_constants,
        "macs": rep.macs,
        "attention_macs": rep.attention_macs,
        "flops": {"total": rep.flops, "mac_flops": rep.mac_flops, "elementwise": rep.elementwise_flops,
                  "by_op": rep.by_op, "assumptions": rep.assumptions, "unknown": rep.unknown,
                  "uncounted": rep.uncounted},
        "attention": attention,
        "attention_error": error,
        "metadata": {k: v for k, v in meta.items() if k != PLAN_KEY},
        "plan": plan,
    }


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def format_table(info: Mapping[str, Any], top_ops: int = 8) -> str:
    """A readable multi-line summary of :func:`inspect`'s dict."""
    lines = [
        f"model      {info['path']}",
        f"producer   {info['producer'] or '?'} (exporter: {info['exporter']}), opset {info['opset']}, IR {info['ir_version']}",
    ]
    for kind in ("inputs", "outputs"):
        for i, t in enumerate(info[kind]):
            head = kind if i == 0 else ""
            lines.append(f"{head:<10} {t['name']}: {t['dtype']} {t['shape']}")
    fl = info["flops"]
    lines.append(f"params     {_human(info['params'])} ({info['params']:,})")
    lines.append(f"MACs       {_human(info['macs'])} (attention matmuls {_human(info['attention_macs'])})")
    lines.append(f"FLOPs      {_human(fl['total'])} = 2 x MACs {_human(fl['mac_flops'])} + elementwise {_human(fl['elementwise'])}")
    for op, v in list(fl["by_op"].items())[:top_ops]:
        lines.append(f"  {op:<22} {_human(v):>8}")
    for a in fl["assumptions"]:
        lines.append(f"note       {a}")
    if fl["unknown"]:
        lines.append(f"note       shapes unknown, not counted: {', '.join(fl['unknown'])}")
    att = info["attention"]
    if att:
        lines.append(f"attention  {len(att)} blocks")
        lines.append(f"  {'layer':>5} {'heads':>5} {'head_dim':>8} {'seq_len':>7}  layout")
        for a in att:
            seq = a["seq_len"] if a["seq_len"] is not None else "dyn"
            lines.append(f"  {a['layer']:>5} {a['heads']:>5} {a['head_dim']:>8} {seq!s:>7}  {a['layout']}")
    else:
        lines.append("attention  no attention blocks" + (f" ({info['attention_error']})" if info.get("attention_error") else ""))
    plan = info.get("plan")
    if plan:
        if "error" in plan:
            lines.append(f"plan       {plan['error']}")
        else:
            heads = sum(len(v) for v in plan.get("heads", {}).values())
            lines.append(f"plan       stored: {heads} heads removed, {len(plan.get('tokens', []))} token stages, "
                         f"{len(plan.get('merges', []))} merged weights, budget {plan.get('budget')}")
    else:
        lines.append("plan       none stored")
    return "\n".join(lines)
