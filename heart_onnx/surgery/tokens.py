"""Insert run-time token selection into an ONNX graph (onnx-graphsurgeon, no torch).

After block ``l`` of each ``TokenStage(after_layer=l, keep=K)``, on its output ``x`` (B, N, D), the
pass inserts THE TOKEN RULE of :mod:`heart_onnx.plan` (``P`` prefix tokens):

- scores (B, N-P): ``cls_attention``: ``Slice`` of block ``l``'s ``Softmax`` output to
  ``[:, :, 0:1, P:N]`` then ``ReduceMean`` over heads (the graph holds only kept heads after the head
  pass); ``linear``: ``Slice(x)[:, P:] @ w + b`` (one ``MatMul``);
- ``TopK`` with a constant K (``sorted=1``, largest, last axis), ``K = keep-P``, or ``N-P`` when
  dropped tokens are fused (a full sort; kept = head, dropped = tail, via ``Slice``);
- ``GatherElements`` on the non-prefix tokens with the indices expanded over D
  (``int32_indices=True`` casts them to INT32 for TensorRT 8.x), ``Concat`` after the prefix tokens;
- fused token (``plan.fuse_dropped``): weights ``s/sum(s)`` (cls_attention) or ``Softmax(s)``
  (linear) of the dropped scores, ``MatMul`` with the gathered dropped tokens, appended last. No
  ``Scatter`` anywhere.

Downstream, every sequence-length carrier is rewritten: ``Reshape``/``Expand``/``ConstantOfShape``/
``Tile`` shape constants holding N (dynamo bakes the token count into them) become the new count, and
attention-mask tensors computed before the stage (``(B|1, 1, N|1, N)``, e.g. BERT's extended mask,
HF ViT's constant mask) are gathered with the same indices (rows and columns; ``0`` for the fused
token) before the later blocks add them to their scores. Several stages compose.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import HeartError, UnsupportedGraph
from ..plan import Plan
from .carriers import SHAPE_INPUT, gs_mod, producer, replace_value, rewrite_shape_input
from .match import const_value


@dataclass(frozen=True)
class StageSpec:
    """One token stage on a graph: counts before/after and where it reads from."""

    layer: int
    n_in: int
    keep: int
    n_out: int  # keep (+1 with a fused token)


def token_schedule(plan: Plan, seq_len: int) -> list[StageSpec]:
    """The stages of ``plan`` with their token counts, starting from ``seq_len`` tokens (checked)."""
    out, n, last = [], int(seq_len), -1
    P = plan.prefix_tokens
    for t in plan.tokens:
        if t.after_layer <= last:
            raise HeartError("token stages must be in increasing after_layer order, one per layer: regenerate the plan")
        last = t.after_layer
        if not P < t.keep <= n:
            raise HeartError(f"token stage after layer {t.after_layer} keeps {t.keep} of {n} tokens "
                             f"({P} prefix): keep must be in ({P}, {n}]")
        if plan.fuse_dropped and t.keep >= n:
            raise HeartError(f"token stage after layer {t.after_layer} keeps all {n} tokens: nothing to fuse")
        n_out = t.keep + (1 if plan.fuse_dropped else 0)
        out.append(StageSpec(t.after_layer, n, t.keep, n_out))
        n = n_out
    return out


class _Builder:
    """Small helper to add nodes to a gs.Graph with unique names."""

    def __init__(self, graph: Any, prefix: str):
        self.g, self.p, self.i = graph, prefix, 0
        self.opset = int(getattr(graph, "opset", None) or 18)

    def c(self, values: Any, dtype: Any = np.int64) -> Any:
        self.i += 1
        return gs_mod().Constant(f"{self.p}_c{self.i}", np.asarray(values, dtype=dtype))

    def op(self, op: str, inputs: list, attrs: dict | None = None, n_out: int = 1, dtype: Any = None) -> Any:
        gs = gs_mod()
        self.i += 1
        outs = [gs.Variable(f"{self.p}_{op}{self.i}_{k}", dtype=dtype) for k in range(n_out)]
        self.g.nodes.append(gs.Node(op, name=f"{self.p}_{op}{self.i}", attrs=attrs or {}, inputs=inputs, outputs=outs))
        return outs[0] if n_out == 1 else outs

    def slice(self, x: Any, start: int, end: int, axis: int | list, starts: list | None = None) -> Any:
        if isinstance(axis, list):
            return self.op("Slice", [x, self.c(starts), self.c(end), self.c(axis)])
        return self.op("Slice", [x, self.c([start]), self.c([end]), self.c([axis])])

    def reduce(self, op: str, x: Any, axes: list, keepdims: int) -> Any:
        if op == "ReduceSum" or self.opset >= 18:
            return self.op(op, [x, self.c(axes)], {"keepdims": keepdims})
        return self.op(op, [x], {"axes": axes, "keepdims": keepdims})

    def unsqueeze(self, x: Any, axes: list) -> Any:
        return self.op("Unsqueeze", [x, self.c(axes)])


def _gather_tokens(b: _Builder, rest: Any, idx: Any, D: int, int32: bool) -> Any:
    """``GatherElements(rest (B, M, D), idx (B, k) expanded over D, axis=1)`` -> (B, k, D)."""
    if int32:
        idx = b.op("Cast", [idx], {"to": 6})  # INT32
    e = b.op("Expand", [b.unsqueeze(idx, [2]), b.c([1, 1, D])])
    return b.op("GatherElements", [rest, e], {"axis": 1})


def _gather_mask_axis(b: _Builder, m: Any, idx: Any, batch_shape: Any, axis: int, P: int, N: int, fuse: bool,
                      other: int, int32: bool) -> Any:
    """Select positions of a 4-D mask ``m`` (B, 1, q, k) along ``axis`` (2 or 3) by prefix + ``idx`` (B, K-P)."""
    # idx (B, K-P) -> (B, 1, 1, K-P) or (B, 1, K-P, 1), expanded over the other axis
    ix = b.unsqueeze(idx, [1, 2] if axis == 3 else [1, 3])
    if int32:
        ix = b.op("Cast", [ix], {"to": 6})
    shp = [1, 1, other, 1] if axis == 3 else [1, 1, 1, other]
    ix = b.op("Expand", [ix, b.c(shp)])
    parts = []
    if P:
        parts.append(b.slice(m, 0, P, axis))
    parts.append(b.op("GatherElements", [b.slice(m, P, N, axis), ix], {"axis": axis}))
    if fuse:  # the fused token attends / is attended: mask value 0
        one = b.slice(m, 0, 1, axis)
        zero = b.c(np.zeros((1, 1, 1, 1), dtype=np.float32), np.float32)
        parts.append(b.op("Expand", [zero, b.op("Shape", [one])]))
    return b.op("Concat", parts, {"axis": axis}) if len(parts) > 1 else parts[0]


def _reach_fwd(starts: Sequence[Any]) -> set:
    seen, stack = set(), list(starts)
    while stack:
        t = stack.pop()
        for n in t.outputs:
            if id(n) not in seen:
                seen.add(id(n))
                stack.extend(n.outputs)
    return seen


def _mask_inputs(sm: Any, downstream: set) -> list[tuple[Any, int, Any]]:
    """(node, input index, tensor) of score-mask operands of Softmax ``sm`` computed before the stage."""
    out, frontier, seen = [], [sm.inputs[0]], set()
    for _ in range(6):
        nxt = []
        for t in frontier:
            n = producer(t)
            if n is None or id(n) in seen or n.op not in ("Add", "Sub", "Where", "Mul", "Div", "Cast"):
                continue
            seen.add(id(n))
            for i, inp in enumerate(n.inputs):
                p = producer(inp)
                shape = getattr(inp, "shape", None)
                is_up = p is None or id(p) not in downstream
                if is_up and n.op in ("Add", "Where") and shape is not None and len(shape) == 4:
                    out.append((n, i, inp))
                elif not is_up:
                    nxt.append(inp)
        frontier = nxt
    return out


def insert_token_stage(graph: Any, x: Any, spec: StageSpec, plan: Plan, *, hidden: int, probs: Any = None,
                       later_softmax: Sequence[Any] = (), int32_indices: bool = False, name: str | None = None,
                       check_shape: bool = True) -> Any:
    """Insert one token stage on tensor ``x`` (B, N, D) of ``graph``; returns the new hidden tensor.

    ``probs``: block's Softmax output (B, H', N, N) for ``cls_attention``; ``later_softmax``: Softmax
    nodes of the blocks after the stage (their score masks are gathered too); ``int32_indices``
    (default False): INT32 gather indices for TensorRT 8.x.
    """
    gs = gs_mod()
    P, N, K, D = plan.prefix_tokens, spec.n_in, spec.keep, hidden
    k = K - P
    fuse = plan.fuse_dropped
    b = _Builder(graph, name or f"heart_tokens_l{spec.layer}")
    consumers = [n for n in x.outputs]
    x_shape = getattr(x, "shape", None)
    if check_shape and x_shape is not None and len(x_shape) == 3 and isinstance(x_shape[1], int) and x_shape[1] != N:
        raise UnsupportedGraph(f"layer {spec.layer} output has {x_shape[1]} tokens, the plan expects {N}: "
                               "does the plan match this model?")
    rest = b.slice(x, P, N, 1) if P else x  # (B, N-P, D)
    # ---- scores (B, N-P)
    if plan.token_scorer == "cls_attention":
        if probs is None:
            raise HeartError(f"cls_attention scoring after layer {spec.layer} needs its attention, but every head "
                             "of that layer is removed: keep a head there or use the linear scorer")
        a = b.op("Slice", [probs, b.c([0, P]), b.c([1, N]), b.c([2, 3])])  # (B, H', 1, N-P)
        s = b.reduce("ReduceMean", a, [1, 2], 0)  # (B, N-P)
    elif plan.token_scorer == "linear":
        if spec.layer not in plan.scorers:
            raise HeartError(f"plan has no linear scorer for layer {spec.layer}: regenerate the plan")
        w, bias = plan.scorers[spec.layer]
        if len(w) != D:
            raise HeartError(f"linear scorer of layer {spec.layer} has {len(w)} weights, the model width is {D}")
        s = b.op("MatMul", [rest, b.c(np.asarray(w, np.float32), np.float32)])  # (B, N-P)
        s = b.op("Add", [s, b.c(np.float32(bias), np.float32)])
    else:
        raise HeartError(f"unknown token scorer {plan.token_scorer!r}: use 'cls_attention' or 'linear'")
    # ---- selection
    if fuse:
        vals, order = b.op("TopK", [s, b.c([N - P])], {"axis": -1, "largest": 1, "sorted": 1}, n_out=2)
        idx = b.slice(order, 0, k, 1)  # (B, K-P)
        tail = b.slice(order, k, N - P, 1)  # (B, N-K)
        s_t = b.slice(vals, k, N - P, 1)  # (B, N-K)
    else:
        _, idx = b.op("TopK", [s, b.c([k])], {"axis": -1, "largest": 1, "sorted": 1}, n_out=2)
    parts = []
    if P:
        parts.append(b.slice(x, 0, P, 1))  # (B, P, D)
    parts.append(_gather_tokens(b, rest, idx, D, int32_indices))  # (B, K-P, D)
    if fuse:
        if plan.token_scorer == "cls_attention":
            w_t = b.op("Div", [s_t, b.reduce("ReduceSum", s_t, [1], 1)])
        else:
            w_t = b.op("Softmax", [s_t], {"axis": -1})
        x_t = _gather_tokens(b, rest, tail, D, int32_indices)  # (B, N-K, D)
        parts.append(b.op("MatMul", [b.unsqueeze(w_t, [1]), x_t]))  # (B, 1, D)
    new_x = b.op("Concat", parts, {"axis": 1}, dtype=x.dtype) if len(parts) > 1 else parts[0]
    new_x.shape = None
    # ---- rewire the consumers of x to the selected tokens
    for n in consumers:
        for i, t in enumerate(n.inputs):
            if t is x:
                n.inputs[i] = new_x
    for i, o in enumerate(graph.outputs):
        if o is x:
            ident = gs.Variable(x.name + "_pruned", dtype=x.dtype, shape=None)
            graph.nodes.append(gs.Node("Identity", name=f"{b.p}_out", inputs=[new_x], outputs=[ident]))
            graph.outputs[i] = ident
    # ---- downstream carriers: sequence length N -> n_out, masks gathered
    down = _reach_fwd([new_x])
    fn = replace_value(N, spec.n_out)
    for n in list(graph.nodes):
        if id(n) in down and n.op in SHAPE_INPUT:
            rewrite_shape_input(graph, n, fn)
    done: dict[int, Any] = {}
    for sm in later_softmax:
        for node, i, m in _mask_inputs(sm, down):
            shape = list(m.shape)
            if not any(d == N for d in shape[-2:]):
                continue
            if id(m) not in done:
                cv = const_value(m)
                if cv is not None and cv.size and np.all(cv == cv.flat[0]):
                    new_shape = [spec.n_out if d == N and j >= 2 else d for j, d in enumerate(cv.shape)]
                    done[id(m)] = b.c(np.full(new_shape, cv.flat[0], dtype=cv.dtype), cv.dtype)
                else:
                    if m.dtype is not None and np.dtype(m.dtype) != np.float32:
                        raise UnsupportedGraph(f"attention mask {m.name} before layer {spec.layer + 1} is not float: "
                                               "token pruning supports additive float masks")
                    bshape = b.slice(b.op("Shape", [x]), 0, 1, 0)  # [B]
                    full = b.op("Expand", [m, b.op("Concat", [bshape, b.c([1, 1, 1])], {"axis": 0})])
                    cur = full
                    if shape[3] == N:
                        cur = _gather_mask_axis(b, cur, idx, bshape, 3, P, N, fuse, shape[2], int32_indices)
                    if shape[2] == N:
                        cur = _gather_mask_axis(b, cur, idx, bshape, 2, P, N, fuse, spec.n_out if shape[3] == N else 1,
                                                int32_indices)
                    cur.shape = [shape[0], shape[1]] + [spec.n_out if d == N else d for d in shape[2:]]
                    done[id(m)] = cur
            node.inputs[i] = done[id(m)]
    return new_x


def insert_token_stages(graph: Any, plan: Plan, block_outputs: Sequence[Any], softmaxes: Sequence[Any | None], *,
                        seq_len: int, hidden: int, int32_indices: bool = False) -> Any:
    """Insert every stage of ``plan`` (in order) and return the graph (not cleaned up).

    ``block_outputs[l]``: block ``l``'s output tensor; ``softmaxes[l]``: its Softmax node, or None
    when its heads are all removed; ``seq_len`` (tokens entering block 0) and ``hidden`` (D).
    """
    specs = token_schedule(plan, seq_len)
    for j, spec in enumerate(specs):
        if not 0 <= spec.layer < len(block_outputs) or block_outputs[spec.layer] is None:
            raise UnsupportedGraph(f"cannot find the output of block {spec.layer} in this graph")
        sm = softmaxes[spec.layer]
        later = [s for s in softmaxes[spec.layer + 1:] if s is not None]
        insert_token_stage(graph, block_outputs[spec.layer], spec, plan, hidden=hidden,
                           probs=sm.outputs[0] if sm is not None else None, later_softmax=later,
                           int32_indices=int32_indices, check_shape=j == 0)
    return graph
