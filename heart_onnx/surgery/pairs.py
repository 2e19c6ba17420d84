"""Apply weight-pair merges (``Plan.merges``) to an ONNX graph with onnx-graphsurgeon (no torch).

Every merge names its weight by the SHA-256 of the PyTorch tensor (float32, C order, layout
``(out, in[, kh, kw])``). The weight is the constant input 1 of a ``Conv`` (as is), ``Gemm``
(as is with ``transB=1``, transposed with ``transB=0``) or ``MatMul`` (transposed: ``(in, out)``).
It is found by hashing every such constant as is and transposed.

Exporters fold an eval-mode BatchNorm into the preceding Conv (both torch exporters do), so a Conv
weight in the graph is ``diag(s) W``, not ``W``, and its hash differs. Pass the original weights
(``weights={name: array}``, e.g. the ``weight`` arrays of ``Sensitivities.pairs`` or a state dict)
and such a layer is found by shape and row proportionality instead; or pass ``anchors`` holding ``"<name>:rowsign"`` signatures
(``heart_onnx.pairing.row_signature``: the sign pattern relative to each row's largest entry, which a
folded row scaling does not change), e.g. ``Plan.anchors`` filled by ``pairing.anchors_for``. The merge rule only combines
weights of the same output row (channel merges: consumer columns, row-wise too), so it commutes with
the folded row scaling and applies to the folded weight unchanged.

- ``unstructured`` / ``2:4``: the MERGE RULE of ``heart_onnx.plan`` on the initializer.
- ``channel``: the consumer's input columns merge by the rule, then the pruned channels are removed
  everywhere: producer weight rows and bias, every per-channel constant on the elementwise path
  between producer and consumer (``BatchNormalization`` parameters, ``Add``/``Mul``/... constants,
  e.g. a MatMul's bias ``Add``), and the consumer's input columns. The layer really shrinks. The path
  must be elementwise and private to the pair (anything else reading those channels makes them not
  removable: ``UnsupportedGraph``).

The pass ends in ``graph.cleanup().toposort()`` and returns the graph.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .._deps import require
from ..errors import UnsupportedGraph
from ..pairing import apply_rule
from ..plan import WeightMerge

# ops whose output channel c depends only on input channel c (plus broadcast constants)
ELEMENTWISE = {
    "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Elu",
    "Selu", "Softplus", "Mish", "Swish", "Sqrt", "Pow", "Exp", "Abs", "Neg", "Identity", "Cast", "Add", "Sub",
    "Mul", "Div", "BatchNormalization", "Max", "Min", "Where",
}


def sha_of(a: np.ndarray) -> str:
    """SHA-256 of float32 C-order bytes (``heart_onnx.models.fingerprint.weight_sha`` on a numpy array)."""
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes(order="C")).hexdigest()


@dataclass
class _Site:
    """A weight constant and how it maps to PyTorch layout."""

    node: Any  # the Conv/Gemm/MatMul node
    tensor: Any  # gs.Constant
    transposed: bool  # graph value is W.T (2-D)
    folded: bool = False  # rows scaled (BatchNorm folded by the exporter)

    def get(self) -> np.ndarray:
        v = np.asarray(self.tensor.values, dtype=np.float32)
        return v.T if self.transposed else v

    def set(self, w_pt: np.ndarray) -> None:
        dtype = np.asarray(self.tensor.values).dtype
        v = w_pt.T if self.transposed else w_pt
        self.tensor.values = np.ascontiguousarray(v).astype(dtype)


def _weight_sites(graph: Any) -> list[_Site]:
    gs = require("onnx_graphsurgeon", "ONNX surgery")
    sites = []
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        t = node.inputs[1]
        if not isinstance(t, gs.Constant):
            continue
        nd = len(t.shape)
        if node.op == "Conv":
            sites.append(_Site(node, t, False))
        elif node.op == "Gemm" and nd == 2:
            if int(node.attrs.get("transA", 0)):
                continue
            sites.append(_Site(node, t, not bool(int(node.attrs.get("transB", 0)))))
        elif node.op == "MatMul" and nd == 2:
            sites.append(_Site(node, t, True))
    return sites


class _Finder:
    def __init__(self, graph: Any, weights: Mapping[str, np.ndarray] | None, anchors: Mapping[str, str] | None = None):
        self.anchors = anchors or {}
        self._rowsig: dict[int, list[tuple[str, bool]]] | None = None
        self.sites = _weight_sites(graph)
        self.by_sha: dict[str, list[_Site]] = {}
        for s in self.sites:
            self.by_sha.setdefault(sha_of(s.get()), []).append(s)
            if len(s.tensor.shape) == 2:  # also the other orientation (a MatMul weight can be W itself)
                alt = _Site(s.node, s.tensor, not s.transposed)
                self.by_sha.setdefault(sha_of(alt.get()), []).append(alt)
        self.weights = weights or {}

    def _row_signed(self) -> list[tuple[str, _Site]]:
        if self._rowsig is None:
            self._rowsig = _row_signed_sites(self.sites)
        return self._rowsig

    def find(self, name: str, sha: str, shape: Sequence[int]) -> list[_Site]:
        found = [s for s in self.by_sha.get(sha, []) if tuple(s.get().shape) == tuple(shape)]
        if found:
            return found
        ref = self.weights.get(name)
        if ref is not None:
            ref = np.asarray(ref, np.float32)
            if tuple(ref.shape) == tuple(shape) and sha_of(ref) == sha:
                folded = [s for s in self.sites if _row_proportional(s.get(), ref)]
                for s in folded:
                    s.folded = True
                if folded:
                    return folded
        rs = self.anchors.get(f"{name}:rowsign")
        if rs is not None:
            folded = [s for s in self._row_signed() if s[0] == rs]
            if folded:
                out = []
                for _, site in folded:
                    if tuple(site.get().shape) == tuple(shape):
                        site.folded = True
                        out.append(site)
                if out:
                    return out
        hint = ("pass the original weights (apply_merges(..., weights={name: array}), e.g. from the "
                "sensitivity file) or plan anchors with row signatures (heart_onnx.pairing.anchors_for) so a Conv "
                "with a folded BatchNorm can be matched" if name not in self.weights
                else "the graph was exported from another model: export this model again")
        raise UnsupportedGraph(f"weight {name} {tuple(shape)} (sha {sha[:12]}) is not in the graph as a Conv/Gemm/MatMul "
                               f"constant: {hint}")


def _row_signed_sites(sites: list[_Site]) -> list[tuple[str, _Site]]:
    from ..pairing import row_signature

    out = []
    for s in sites:
        out.append((row_signature(s.get()), s))
        if len(s.tensor.shape) == 2:
            alt = _Site(s.node, s.tensor, not s.transposed)
            out.append((row_signature(alt.get()), alt))
    return out


def _row_proportional(v: np.ndarray, ref: np.ndarray) -> bool:
    if v.shape != ref.shape or v.ndim < 2:
        return False
    a = v.reshape(v.shape[0], -1).astype(np.float64)
    b = ref.reshape(ref.shape[0], -1).astype(np.float64)
    nb = (b * b).sum(1)
    s = np.where(nb > 0, (a * b).sum(1) / np.where(nb > 0, nb, 1.0), 0.0)
    tol = 1e-4 * np.abs(a).max(axis=1, keepdims=True) + 1e-12
    return bool(np.all(np.abs(a - s[:, None] * b) <= tol))


def _same_row(m: WeightMerge) -> bool:
    r = int(np.prod(m.shape[1:]))
    return bool(np.all(np.asarray(m.pruned) // r == np.asarray(m.partner) // r))


# ---------------------------------------------------------------------------------------------- channel path
def _slice_const(node: Any, i: int, keep: np.ndarray, c_old: int, axis_from_end: int | None, axis0: bool) -> None:
    """Replace constant input ``i`` of ``node`` by its channel slice (a new constant; shared ones stay intact)."""
    gs = require("onnx_graphsurgeon", "ONNX surgery")
    t = node.inputs[i]
    v = np.asarray(t.values)
    if v.ndim == 0 or v.size == 1:
        return
    ax = 0 if axis0 else (v.ndim - axis_from_end if axis_from_end is not None and v.ndim >= axis_from_end else None)
    if ax is None or v.shape[ax] == 1:
        if ax is None and c_old in v.shape:
            raise UnsupportedGraph(f"{node.op} node {node.name!r} has a constant {v.shape} that does not broadcast along "
                                   f"the merged channels: this channel pair cannot be shrunk")
        return
    if v.shape[ax] != c_old:
        raise UnsupportedGraph(f"{node.op} node {node.name!r} constant {v.shape} does not match {c_old} channels: "
                               f"this channel pair cannot be shrunk")
    node.inputs[i] = gs.Constant(f"{t.name}_kept{len(keep)}_{id(node)}", np.ascontiguousarray(np.take(v, keep, axis=ax)))


def _channel_path(producer: Any, consumer: Any) -> list[Any]:
    """Nodes strictly between producer and consumer; all elementwise, read only inside the pair."""
    gs = require("onnx_graphsurgeon", "ONNX surgery")
    out = producer.outputs[0]
    path, frontier, seen, pending = [], [out], set(), []
    while frontier:
        t = frontier.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if not t.outputs:
            raise UnsupportedGraph(f"channels of {producer.name!r} reach a graph output: they cannot be removed")
        for n in t.outputs:
            if n is consumer:
                continue
            if n.op not in ELEMENTWISE:
                raise UnsupportedGraph(f"between {producer.name!r} and {consumer.name!r} there is a {n.op} node "
                                       f"({n.name!r}): channel merging needs an elementwise path (BatchNorm, activation)")
            if all(n is not p for p in path):
                path.append(n)
                for t_in in n.inputs:
                    if isinstance(t_in, gs.Variable) and t_in is not out and not (
                            t_in.inputs and any(t_in.inputs[0] is p for p in path)):
                        if not t_in.inputs or t_in.inputs[0].op != "Constant":
                            pending.append((n, t_in))
            frontier.extend(n.outputs)
    for n, t_in in pending:  # every variable a path node reads must come from the path itself
        if not (t_in.inputs and any(t_in.inputs[0] is p for p in path)):
            raise UnsupportedGraph(f"{n.op} node {n.name!r} between {producer.name!r} and {consumer.name!r} also reads "
                                   f"{t_in.name!r} from outside the pair: these channels cannot be removed")
    if not any(consumer is n for t in [out] + [o for p in path for o in p.outputs] for n in t.outputs):
        raise UnsupportedGraph(f"{producer.name!r} does not feed {consumer.name!r}: wrong channel pair")
    return path


def _apply_channel(graph: Any, m: WeightMerge, prod: _Site, cons: _Site) -> None:
    gs = require("onnx_graphsurgeon", "ONNX surgery")
    c_old = int(m.shape[0])
    keep = np.setdiff1d(np.arange(c_old), np.asarray(m.pruned, np.int64))
    for node, what in ((prod.node, "producer"), (cons.node, "consumer")):
        if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
            raise UnsupportedGraph(f"{what} Conv {node.name!r} is grouped (group={node.attrs['group']}): channel merging "
                                   f"needs ordinary convolutions")
    path = _channel_path(prod.node, cons.node)
    # consumer: merge columns by the rule, then drop the pruned ones
    c_new = apply_rule(cons.get(), m, "consumer")
    cons.set(np.ascontiguousarray(np.take(c_new, keep, axis=1)))
    # producer rows and bias
    prod.set(np.ascontiguousarray(np.take(prod.get(), keep, axis=0)))
    pn = prod.node
    bias_i = 2 if pn.op in ("Conv", "Gemm") and len(pn.inputs) > 2 else None
    if bias_i is not None and isinstance(pn.inputs[bias_i], gs.Constant):
        _slice_const(pn, bias_i, keep, c_old, 1, axis0=False)
    chan_from_end = 3 if pn.op == "Conv" else 1  # NCHW channel axis is -3 for 2-D convs; features are last
    if pn.op == "Conv":
        chan_from_end = len(prod.get().shape) - 1  # Conv1d/2d/3d: channel axis counted from the end
    for n in path:
        for i, t in enumerate(n.inputs):
            if isinstance(t, gs.Constant):
                _slice_const(n, i, keep, c_old, chan_from_end, axis0=(n.op == "BatchNormalization" and i > 0)
                             or (n.op == "PRelu" and pn.op == "Conv" and np.asarray(t.values).ndim == 1))
        for o in n.outputs:
            o.shape = None  # stale channel counts; onnx shape inference fills them again
    for o in pn.outputs:
        o.shape = None


# ---------------------------------------------------------------------------------------------- the pass
def apply_merges(graph: Any, merges: Sequence[WeightMerge], weights: Mapping[str, np.ndarray] | None = None,
                 anchors: Mapping[str, str] | None = None) -> Any:
    """Apply ``merges`` to ``graph`` (a ``gs.Graph``) in place; returns it after ``cleanup().toposort()``.

    ``weights`` (default ``None``): original PyTorch weights by name, to find Conv weights that the
    exporter folded a BatchNorm into (see the module docstring). ``anchors`` (default ``None``): e.g.
    ``Plan.anchors``; entries ``"<name>:rowsign"`` (``heart_onnx.pairing.anchors_for``) find such folded
    weights without the originals. Raises ``UnsupportedGraph`` when a weight cannot be found or a
    channel pair cannot be shrunk.
    """
    finder = _Finder(graph, weights, anchors)
    for m in merges:
        sites = finder.find(m.weight, m.weight_sha, m.shape)
        if m.granularity in ("unstructured", "2:4"):
            for s in _unique(sites):
                if s.folded and not _same_row(m):
                    raise UnsupportedGraph(f"merge of {m.weight} pairs weights of different output rows, which a folded "
                                           f"BatchNorm rescales differently: export without folding or regenerate the merge")
                s.set(apply_rule(s.get(), m))
        elif m.granularity == "channel":
            if m.consumer is None or m.consumer_sha is None or m.consumer_shape is None:
                raise UnsupportedGraph(f"channel merge of {m.weight} names no consumer: regenerate the plan")
            csites = _unique(finder.find(m.consumer, m.consumer_sha, m.consumer_shape))
            psites = _unique(sites)
            if len(psites) != 1 or len(csites) != 1:
                raise UnsupportedGraph(f"channel merge {m.weight} -> {m.consumer}: each weight must feed exactly one "
                                       f"node (found {len(psites)} and {len(csites)})")
            _apply_channel(graph, m, psites[0], csites[0])
        else:
            raise UnsupportedGraph(f"unknown merge granularity {m.granularity!r}: regenerate the plan with this heart-onnx")
    return graph.cleanup().toposort()


def _unique(sites: list[_Site]) -> list[_Site]:
    """One site per constant tensor (a constant read by several nodes is merged once)."""
    out, seen = [], set()
    for s in sites:
        if id(s.tensor) not in seen:
            seen.add(id(s.tensor))
            out.append(s)
    return out


def apply_merges_to_model(model: Any, merges: Sequence[WeightMerge], weights: Mapping[str, np.ndarray] | None = None,
                          anchors: Mapping[str, str] | None = None) -> Any:
    """``onnx.ModelProto`` in, merged ``onnx.ModelProto`` out (shapes re-inferred); options as :func:`apply_merges`."""
    gs = require("onnx_graphsurgeon", "ONNX surgery")
    onnx = require("onnx", "ONNX surgery")
    graph = apply_merges(gs.import_onnx(model), merges, weights, anchors)
    out = gs.export_onnx(graph)
    out.opset_import[:] = model.opset_import
    out.ir_version = model.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    try:
        out = onnx.shape_inference.infer_shapes(out)
    except Exception:  # noqa: BLE001 - shapes are a convenience, the graph is valid without them
        pass
    return out
