"""Rewrite constant shape carriers of a ``gs.Graph`` (no torch): the head and token passes use these.

    rewrite_shape_input(graph, reshape_node, replace_value(197, 138))   # 197 -> 138 in its shape
    clear_shapes(graph)                                                 # stale shapes after surgery

Shared constants (the dynamo exporter de-duplicates equal initializers) are never modified in place:
a rewritten input gets a new constant; a ``Concat`` of shape pieces gets a private copy.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .._deps import require
from .match import const_value

SHAPE_INPUT = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1}  # op -> index of its shape input


def gs_mod() -> Any:
    return require("onnx_graphsurgeon", "ONNX surgery")


def producer(t: Any) -> Any | None:
    """The node that computes tensor ``t`` (None for graph inputs and constants)."""
    return t.inputs[0] if getattr(t, "inputs", None) else None


def rewrite_shape_input(graph: Any, node: Any, fn: Callable[[np.ndarray], np.ndarray]) -> bool:
    """Rewrite the constant entries of ``node``'s shape input with ``fn`` (values in, values out).

    A constant input is replaced by a new constant; a ``Concat`` of pieces gets a private copy whose
    constant pieces are rewritten (pieces computed at run time are kept). Returns True when something
    changed.
    """
    gs = gs_mod()
    i = SHAPE_INPUT.get(node.op)
    if i is None or len(node.inputs) <= i:
        return False
    src = node.inputs[i]
    v = const_value(src)
    if v is not None:
        nv = fn(v.copy())
        if np.array_equal(nv, v):
            return False
        node.inputs[i] = gs.Constant(f"{node.name}_shape_heart", np.asarray(nv, dtype=v.dtype))
        return True
    cat = producer(src)
    if cat is None or cat.op != "Concat":
        return False
    new_in, changed = [], False
    for j, piece in enumerate(cat.inputs):
        pv = const_value(piece)
        if pv is not None:
            nv = fn(pv.copy())
            if not np.array_equal(nv, pv):
                changed = True
                piece = gs.Constant(f"{node.name}_shape{j}_heart", np.asarray(nv, dtype=pv.dtype))
        new_in.append(piece)
    if not changed:
        return False
    out = gs.Variable(f"{node.name}_shape_heart", dtype=src.dtype, shape=src.shape)
    graph.nodes.append(gs.Node("Concat", name=f"{cat.name}_heart_{node.name}", attrs=dict(cat.attrs),
                               inputs=new_in, outputs=[out]))
    node.inputs[i] = out
    return True


def replace_value(old: int, new: int) -> Callable[[np.ndarray], np.ndarray]:
    """A rewrite for :func:`rewrite_shape_input`: every entry equal to ``old`` becomes ``new`` (1-D only)."""
    def fn(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v).copy()
        if v.ndim <= 1:
            v[v == old] = new
        return v

    return fn


def clear_shapes(graph: Any) -> None:
    """Forget every intermediate tensor's shape (stale after surgery; onnx shape inference refills them)."""
    gs = gs_mod()
    outs = {id(t) for t in graph.outputs}
    ins = {id(t) for t in graph.inputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and id(t) not in outs and id(t) not in ins:
            t.shape = None
