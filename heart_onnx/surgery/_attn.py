"""Graph helpers shared by the head and token passes (no torch): find attention blocks by structure,
read and rewrite constant shape carriers.

An attention block is found from its ``Softmax``: the ``MatMul`` before it (q @ k^T), the ``MatMul``
after it (probs @ v); walking back from q, k and v to the first ``MatMul``/``Gemm`` whose constant
weight has ``hidden`` rows (PyTorch ``in`` = hidden) gives the projections; walking forward from the
attention output to the first such layer gives the output projection. Blocks are numbered in
topological order of their Softmax, which is the layer order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from .._deps import require
from ..errors import UnsupportedGraph

PASS_THROUGH = {"Add", "Mul", "Div", "Sub", "Where", "Cast", "Dropout", "Identity", "Transpose", "Reshape", "Squeeze",
                "Unsqueeze", "Softmax", "IsNaN", "Neg", "Slice", "Concat", "Split", "Gather"}


def gs_mod() -> Any:
    return require("onnx_graphsurgeon", "ONNX surgery")


def const_value(t: Any) -> np.ndarray | None:
    """The numpy value of a constant tensor (a ``gs.Constant`` or a ``Constant`` node's output), else None."""
    gs = gs_mod()
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if t.inputs and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        n = t.inputs[0]
        v = n.attrs.get("value")
        if v is not None:
            return np.asarray(v.values)
        for k in ("value_ints", "value_floats"):
            if k in n.attrs:
                return np.asarray(n.attrs[k])
        for k in ("value_int", "value_float"):
            if k in n.attrs:
                return np.asarray(n.attrs[k])
    return None


def producer(t: Any) -> Any | None:
    return t.inputs[0] if getattr(t, "inputs", None) else None


def weight_of(node: Any) -> tuple[np.ndarray, int] | None:
    """(value, in_axis) of a MatMul/Gemm's constant 2-D weight: ``in_axis`` is the reduction axis."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    w = const_value(node.inputs[1])
    if w is None or w.ndim != 2 or w.dtype.kind != "f":
        return None
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return None
        return w, (1 if node.attrs.get("transB", 0) else 0)
    return w, 0


def bias_add(node: Any) -> tuple[Any, int, np.ndarray] | None:
    """The ``Add`` right after a MatMul adding a constant 1-D bias: (add_node, const_input_index, value)."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    for i, t in enumerate(add.inputs):
        if t is out:
            continue
        v = const_value(t)
        if v is not None and v.ndim == 1:
            return add, i, v
    return None


@dataclass
class AttentionBlock:
    """One attention block of a graph (see the module docstring)."""

    index: int
    softmax: Any
    qk: Any  # MatMul(q, k^T)
    av: Any  # MatMul(probs, v)
    q: Any  # projection nodes (the same node three times for a fused qkv)
    k: Any
    v: Any
    proj: Any  # output projection
    region: list = field(default_factory=list)  # nodes strictly between the projections and proj

    @property
    def fused(self) -> bool:
        return self.q is self.k is self.v

    @property
    def projections(self) -> list:
        return [self.q] if self.fused else [self.q, self.k, self.v]

    @property
    def attn_out(self) -> Any:
        """The attention branch output: after the projection's bias Add (Gemm: its output)."""
        b = bias_add(self.proj) if self.proj.op == "MatMul" else None
        return b[0].outputs[0] if b else self.proj.outputs[0]


def _walk_back(t: Any, hidden: int, stop: set) -> Any | None:
    """First MatMul/Gemm with a (hidden, x) weight reached walking back from tensor ``t`` (BFS)."""
    seen, queue = set(), [t]
    while queue:
        cur = queue.pop(0)
        n = producer(cur)
        if n is None or id(n) in seen or id(n) in stop:
            continue
        seen.add(id(n))
        w = weight_of(n)
        if w is not None and w[0].shape[w[1]] == hidden:
            return n
        if n.op in ("LayerNormalization", "Softmax", "SimplifiedLayerNormalization"):
            continue
        queue.extend(i for i in n.inputs if not isinstance(i, gs_mod().Constant))
    return None


def _walk_fwd(t: Any, hidden_in: int) -> Any | None:
    seen, queue = set(), [t]
    while queue:
        cur = queue.pop(0)
        for n in cur.outputs:
            if id(n) in seen:
                continue
            seen.add(id(n))
            w = weight_of(n)
            if w is not None and n.inputs[0] is cur:
                return n
            if n.op in PASS_THROUGH:
                queue.extend(n.outputs)
    return None


def _reach(starts: Iterable[Any], forward: bool, stop: set) -> set:
    """ids of nodes reachable from tensors ``starts`` (forward: consumers; backward: producers)."""
    seen: set = set()
    stack = list(starts)
    while stack:
        t = stack.pop()
        nodes = t.outputs if forward else t.inputs
        for n in nodes:
            if id(n) in seen or id(n) in stop:
                continue
            seen.add(id(n))
            stack.extend(n.outputs if forward else n.inputs)
    return seen


def find_attention(graph: Any, hidden: int) -> list[AttentionBlock]:
    """Every attention block of ``graph`` in layer order (raises UnsupportedGraph when none is found)."""
    graph.toposort()
    blocks = []
    for sm in [n for n in graph.nodes if n.op == "Softmax"]:
        qk = None
        frontier, seen = [sm.inputs[0]], set()
        for _ in range(6):  # BFS back through scale / mask ops to the score MatMul
            nxt = []
            for t in frontier:
                n = producer(t)
                if n is None or id(n) in seen:
                    continue
                seen.add(id(n))
                if n.op == "MatMul" and weight_of(n) is None:
                    qk = n
                    break
                if n.op in ("Add", "Mul", "Div", "Where", "Cast", "Sub"):
                    nxt.extend(i for i in n.inputs if not isinstance(i, gs_mod().Constant))
            if qk is not None or not nxt:
                break
            frontier = nxt
        av = None
        frontier = [sm.outputs[0]]
        for _ in range(4):
            nxt = []
            for tt in frontier:
                for c in tt.outputs:
                    if c.op == "MatMul" and weight_of(c) is None:
                        av = c
                    elif c.op in ("Where", "Cast", "Dropout", "Identity", "IsNaN"):
                        nxt.extend(c.outputs)
            if av is not None or not nxt:
                break
            frontier = nxt
        if qk is None or av is None:
            continue
        stop = {id(sm)}
        q = _walk_back(qk.inputs[0], hidden, stop)
        k = _walk_back(qk.inputs[1], hidden, stop)
        v = _walk_back(av.inputs[1], hidden, stop)
        proj = _walk_fwd(av.outputs[0], hidden)
        if any(x is None for x in (q, k, v, proj)):
            raise UnsupportedGraph(f"attention block at {sm.name} has no recognisable q/k/v or output projection: "
                                   "export with heart-onnx export (dynamo or torchscript)")
        if len({id(q), id(k), id(v)}) == 2:
            raise UnsupportedGraph(f"attention block at {sm.name}: q, k, v share only part of a projection")
        blk = AttentionBlock(len(blocks), sm, qk, av, q, k, v, proj)
        projs = blk.projections
        fwd = _reach([p.outputs[0] for p in projs], True, {id(proj)})
        bwd = _reach([proj.inputs[0]], False, {id(p) for p in projs})
        blk.region = [n for n in graph.nodes if id(n) in fwd and id(n) in bwd]
        blocks.append(blk)
    if not blocks:
        raise UnsupportedGraph("no attention block (Softmax between two MatMuls) found in this graph: "
                               "is it a transformer exported with heart-onnx export?")
    return blocks


# ------------------------------------------------------------------------------ shape carriers
SHAPE_INPUT = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0, "Tile": 1}


def rewrite_shape_input(graph: Any, node: Any, fn: Callable[[np.ndarray], np.ndarray]) -> bool:
    """Rewrite the constant entries of ``node``'s shape input with ``fn`` (values in, values out).

    A constant input is replaced by a new constant; a ``Concat`` of pieces gets a private copy whose
    constant pieces are rewritten (pieces computed at run time are kept). Shared constants are never
    modified in place. Returns True when something changed.
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
    def fn(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v).copy()
        if v.ndim <= 1:
            v[v == old] = new
        return v

    return fn


def clear_shapes(graph: Any) -> None:
    """Forget every intermediate tensor's shape (stale after surgery; onnx shape inference refills them)."""
    outs = {id(t) for t in graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs_mod().Variable) and id(t) not in outs and all(t is not i for i in graph.inputs):
            t.shape = None
