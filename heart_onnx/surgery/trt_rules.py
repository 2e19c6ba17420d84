"""What TensorRT accepts in the graphs surgery emits (DESIGN.md, "What TensorRT accepts"); no torch.

``check_trt_rules(model)`` lists violations as one-line strings (empty list: the graph follows the
rules): ``TopK`` K a constant initializer below 3840, ``sorted=1``, axis within the last four dims;
no ``NonZero`` (data-dependent shapes); no ``ScatterElements``/``ScatterND`` with a reduction; with
``int32_indices=True`` every ``GatherElements`` index computed at run time must be INT32.
"""
from __future__ import annotations

from typing import Any

import numpy as np

TOPK_MAX = 3840
INT32 = 6


def _consts(graph: Any, max_elements: int = 4096) -> tuple[dict[str, np.ndarray], set[str]]:
    """Values of the small constants (TopK K, indices) and the names of every constant.

    Big initializers are not read (weights play no part in these rules; surgery checks a copy whose
    untouched weights are external-data stubs).
    """
    from onnx import numpy_helper

    names = {i.name for i in graph.initializer}
    out = {}
    for i in graph.initializer:
        n = 1
        for d in i.dims:
            n *= d
        if n <= max_elements and i.data_location != 1:
            out[i.name] = numpy_helper.to_array(i)
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
            names.add(n.output[0])
    return out, names


def _attr(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def check_trt_rules(model: Any, int32_indices: bool = False) -> list[str]:
    """Violations of the TensorRT rules in ``model`` (``onnx.ModelProto``); ``int32_indices`` default False."""
    import onnx

    g = model.graph
    consts, const_names = _consts(g)
    ranks: dict[str, int] = {}
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                ranks[vi.name] = len(tt.shape.dim)
    except Exception:  # noqa: BLE001 - rules that need shapes are skipped
        pass
    bad: list[str] = []
    for n in g.node:
        where = f"{n.op_type} {n.name or n.output[0]}"
        if n.op_type == "TopK":
            k = consts.get(n.input[1]) if len(n.input) > 1 else None
            if k is None:
                bad.append(f"{where}: K is computed at run time (TensorRT needs a constant initializer)")
            elif int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX:
                bad.append(f"{where}: K={int(np.asarray(k).reshape(-1)[0])} is not below {TOPK_MAX}")
            if int(_attr(n, "sorted", 1)) != 1:
                bad.append(f"{where}: sorted=0 (TensorRT needs sorted=1)")
            axis = int(_attr(n, "axis", -1))
            r = ranks.get(n.input[0])
            if r is not None and (axis if axis < 0 else axis - r) < -4:
                bad.append(f"{where}: axis {axis} is not within the last four dims")
        elif n.op_type == "NonZero":
            bad.append(f"{where}: NonZero makes data-dependent shapes (use TopK + GatherElements)")
        elif n.op_type in ("ScatterElements", "ScatterND") and str(_attr(n, "reduction", b"none")).strip("b'\"") != "none":
            bad.append(f"{where}: Scatter with reduction is rejected or wrong in TensorRT (fuse with MatMul/ReduceSum)")
        elif int32_indices and n.op_type == "GatherElements" and len(n.input) > 1:
            idx = n.input[1]
            if idx in const_names:
                continue
            t = types.get(idx)
            if t is not None and t != INT32:
                bad.append(f"{where}: run-time indices are not INT32 (TensorRT 8.x)")
    return bad
