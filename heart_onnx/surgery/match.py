"""Find attention blocks and linear layers in an ONNX graph by structure (no torch).

    graph = import_graph(model)                 # gs.Graph with shapes inferred (data propagation on)
    blocks = find_attention_blocks(graph)       # [AttentionBlock], layer order
    linears = find_linear_layers(graph)         # [Linear]: MatMul/Gemm/Conv with a constant weight
    hit = find_initializer_by_sha(graph, sha)   # (Constant, transposed) of a PyTorch weight, or None

Node names are unreliable (dynamo names nodes ``node_MatMul_12``; TorchScript uses module scopes;
onnx-graphsurgeon round trips keep neither meaningfully), so blocks are found from their ``Softmax``:

1. the score ``MatMul`` (q @ k^T, both inputs computed) is found walking back from the Softmax through
   scale/mask ops (``Add``, ``Mul``, ``Div``, ``Where``, ``Cast``); the context ``MatMul`` (probs @ v)
   walking forward through ``Where``/``IsNaN``/``Cast``/``Dropout``;
2. q, k and v are traced back through data inputs only (never into ``Shape`` or a Reshape's shape
   input) to the first ``MatMul``/``Gemm`` with a constant weight; the output projection is the first
   such layer after the context MatMul;
3. the layout comes from the first Reshape after the projection: ``[B, N, 3, H, Dh]`` is
   ``"fused_timm"`` (columns ordered ``[3, H, Dh]``; a fused projection split along its last axis is
   the same column order), ``[B, N, H, 3*Dh]`` is ``"neox_interleaved"`` (``[H, 3, Dh]``), three
   projections are ``"separate"``;
4. every constant that carries the head count, the attention width ``H*Dh`` or the sequence length
   inside the block (Reshape/Expand shape constants, also as pieces of a ``Concat``; mask and rotary
   tensors with a sequence axis) is listed as a :class:`Carrier` with the role of each entry.

What the exported graphs look like (torch 2.14, opset 18 dynamo / 17 TorchScript, seen on tiny and
full-size models, printed op by op):

- timm ViT/DeiT, dynamo: qkv ``MatMul``+``Add`` -> ``Reshape [-1, 197, 3, H, Dh]`` -> ``Transpose
  [2,0,3,1,4]`` -> three ``Slice``+``Squeeze``; k goes ``Reshape [-1, N, Dh]`` -> ``Transpose`` ->
  ``Reshape [B, H, Dh, N]`` (B a constant only with a static batch; with a dynamic batch these two
  shapes come from ``Shape`` + ``Concat``); the scale is split as ``Mul(q, s)``, ``Mul(k^T, s)``, s =
  Dh^-1/4; after attention ``Transpose [0,2,1,3]`` -> ``Reshape [-1, N, H*Dh]``. With a static batch
  of 1 the leading entry is 1 instead of -1. DeiT distilled: same block, N = patches + 2.
- timm ViT, TorchScript: the same block with ``Constant`` nodes instead of initializers, a
  ``Split`` instead of Slices, and (dynamic batch) every shape built from ``Shape`` ->
  ``Gather``/``Slice`` -> ``Concat`` with constant pieces. Equal initializers are de-duplicated
  through ``Identity`` nodes (zero biases of random-init models share one constant): never modify a
  constant in place, give the consumer a new one (:meth:`Linear.set_weight` does).
- HF ViT/DeiT (transformers 5: ``q_proj``/``k_proj``/``v_proj``/``o_proj``): three projections, each
  ``Reshape [B, N, -1, Dh]`` (head count as -1) -> ``Transpose``; dynamo adds a constant mask
  ``Add`` of shape ``[1, 1, N, N]`` before the Softmax and ``IsNaN``/``Where`` after it; TorchScript
  reshapes the context with ``[B, -1, N, Dh]`` before the ``Transpose`` and ``Reshape [B, N, -1]``.
- HF GPT-NeoX (Pythia): one projection, ``Reshape [B, N, -1, 3*Dh]`` -> ``Transpose`` -> ``Split``
  (or Slices) on the last axis into q, k, v (per-head interleaved columns); rotary on the first
  ``rotary_pct*Dh`` dims through ``Slice``/``Neg``/``Concat``/``Mul`` by cos/sin (constants
  ``[1, 1, N, r]`` with a static sequence, computed from ``Range`` with a dynamic one); causal mask
  ``Where`` -> ``Add``; parallel residual: the attention and MLP outputs are added, then the block
  input. With random weights the dynamo optimiser merges the two LayerNorms into one.
- HF BERT: post-norm; three projections like HF ViT; ``Add`` of the extended mask before the Softmax;
  the block output is the second ``LayerNormalization``.

A graph without a Softmax-between-MatMuls (a CNN) has no blocks: ``find_attention_blocks`` returns
``[]`` (``require=True`` raises instead). A Softmax that looks like attention but whose projections
cannot be traced raises ``UnsupportedGraph`` naming the layer and what was expected.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from .._deps import require
from ..errors import HeartError, UnsupportedGraph

Layout = Literal["fused_timm", "neox_interleaved", "separate"]
Exporter = Literal["dynamo", "torchscript", "unknown"]

_PASS_WEIGHT = ("Identity", "Transpose", "Cast")  # ops allowed between a constant and a weight input
_SCORE_BACK = {"Add", "Mul", "Div", "Sub", "Where", "Cast", "Identity", "Dropout"}
_PROBS_FWD = {"Where", "Cast", "Dropout", "Identity", "IsNaN", "Mul"}
_DATA_INPUTS = {  # op -> indices of inputs that carry data (shape/index inputs are not followed)
    "Reshape": (0,), "Expand": (0,), "Transpose": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Slice": (0,),
    "Split": (0,), "Gather": (0,), "Identity": (0,), "Cast": (0,), "Dropout": (0,), "Neg": (0,),
    "Flatten": (0,), "Tile": (0,), "Pad": (0,), "Sqrt": (0,), "Reciprocal": (0,),
}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Concat", "Max", "Min"}
_STOP = {"LayerNormalization", "SimplifiedLayerNormalization", "Softmax", "Shape", "Size", "Range",
         "ReduceMean", "GroupNormalization", "BatchNormalization"}


def _gs() -> Any:
    return require("onnx_graphsurgeon", "ONNX graph matching")


# ============================================================================ small graph helpers
CACHE_ELEMENTS = 1 << 16  # lazily loaded constants up to this size are cached on the gs.Constant


def const_value(t: Any) -> np.ndarray | None:
    """numpy value of a ``gs.Constant`` or of a ``Constant`` node's output; None if computed.

    Big constants still held by the ONNX proto (onnx-graphsurgeon ``LazyValues``) are loaded as a
    fresh array each time and not cached on the graph: weights stay in the proto only, so surgery and
    export do not hold a second copy of the model (read once, keep the array if you need it twice).
    """
    gs = _gs()
    if isinstance(t, gs.Constant):
        try:
            lazy = _lazy(t)
            if lazy is not None and _volume(lazy.shape) > CACHE_ELEMENTS:
                return np.asarray(lazy.load())
            return np.asarray(t.values)
        except Exception:  # noqa: BLE001 - unreadable external data / corrupt tensor
            return None
    if t is not None and len(getattr(t, "inputs", ())) == 1 and t.inputs[0].op == "Constant":
        attrs = t.inputs[0].attrs
        if "value" in attrs and isinstance(attrs["value"], gs.Constant):
            return const_value(attrs["value"])
        for k in ("value_ints", "value_floats", "value_int", "value_float"):
            if k in attrs:
                return np.asarray(attrs[k])
    return None


def _lazy(t: Any) -> Any | None:
    """The ``LazyValues`` of a gs.Constant not loaded yet, else None."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    v = getattr(t, "_values", None)
    return v if isinstance(v, LazyValues) else None


def _volume(shape: Any) -> int:
    n = 1
    for d in shape or ():
        n *= int(d)
    return n


def const_meta(t: Any) -> tuple[tuple, np.dtype] | None:
    """(shape, dtype) of a constant without loading its values; None if ``t`` is computed."""
    gs = _gs()
    if isinstance(t, gs.Constant):
        try:
            return tuple(int(d) for d in t.shape), np.dtype(t.dtype)
        except Exception:  # noqa: BLE001 - unknown dtype
            v = const_value(t)
            return None if v is None else (v.shape, v.dtype)
    v = const_value(t)
    return None if v is None else (v.shape, v.dtype)


def _producer(t: Any) -> Any | None:
    ins = getattr(t, "inputs", None)
    return ins[0] if ins else None


def _is_const(t: Any) -> bool:
    return isinstance(t, _gs().Constant) or const_value(t) is not None


def _resolve_const(t: Any) -> tuple[Any, list[Any]] | None:
    """Follow ``Identity``/``Transpose``/``Cast`` back to a constant: (constant tensor, ops on the way)."""
    chain: list[Any] = []
    for _ in range(4):
        if _is_const(t):
            return t, chain
        p = _producer(t)
        if p is None or p.op not in _PASS_WEIGHT or not p.inputs:
            return None
        chain.append(p)
        t = p.inputs[0]
    return None


def _dims(t: Any) -> list | None:
    shape = getattr(t, "shape", None)
    if shape is None:
        return None
    return [d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]


# ============================================================================ linear layers
@dataclass(eq=False)
class Linear:
    """A MatMul/Gemm/Conv/ConvTranspose whose weight is a constant (possibly behind Identity/Transpose).

    ``layout`` says how the weight the node sees relates to PyTorch's ``(out, in[, k...])``:
    ``"in_out"`` (MatMul, Gemm transB=0: the transpose) or ``"out_in"`` (Gemm transB=1, Conv,
    ConvTranspose: as is). ``weight_const`` is the stored constant; ``weight_ops`` the Identity/
    Transpose/Cast nodes between it and the layer. ``bias_node`` is the ``Add`` after a MatMul (or the
    node itself for Gemm/Conv); ``output`` the tensor after the bias.
    """

    node: Any
    weight_const: Any
    weight_ops: list = field(default_factory=list)
    layout: Literal["in_out", "out_in"] = "in_out"
    bias_const: Any = None
    bias_node: Any = None
    bias_index: int | None = None  # input index of the bias in bias_node
    output: Any = None

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def weight(self) -> np.ndarray:
        """The weight as the node sees it (after Identity/Transpose/Cast)."""
        w = const_value(self.weight_const)
        for op in self.weight_ops[::-1]:
            if op.op == "Transpose":
                perm = op.attrs.get("perm")
                w = np.transpose(w, perm) if perm is not None else w.T
            elif op.op == "Cast":
                w = w.astype(_np_dtype(op.attrs.get("to", 1)))
        return w

    @property
    def bias(self) -> np.ndarray | None:
        return None if self.bias_const is None else const_value(self.bias_const)

    def torch_weight(self) -> np.ndarray:
        """The weight in PyTorch layout ``(out, in[, k...])``."""
        w = self.weight
        return w.T if self.layout == "in_out" and w.ndim == 2 else w

    @property
    def weight_shape(self) -> tuple:
        """Shape of :attr:`weight` (as the node sees it), without loading the values."""
        shape = tuple(const_meta(self.weight_const)[0])
        for op in self.weight_ops[::-1]:
            if op.op == "Transpose":
                perm = op.attrs.get("perm")
                shape = tuple(shape[p] for p in perm) if perm is not None else shape[::-1]
        return shape

    def _torch_shape(self) -> tuple:
        s = self.weight_shape
        return s[::-1] if self.layout == "in_out" and len(s) == 2 else s

    @property
    def in_features(self) -> int:
        return int(self._torch_shape()[1]) * (int(self.node.attrs.get("group", 1)) if self.op == "Conv" else 1)

    @property
    def out_features(self) -> int:
        s = self._torch_shape()
        if self.op == "ConvTranspose":
            return int(s[1]) * int(self.node.attrs.get("group", 1))
        return int(s[0])

    def set_weight(self, torch_layout: np.ndarray, name: str | None = None) -> None:
        """Give the layer a new weight (PyTorch layout); a new constant, the old one is not touched."""
        gs = _gs()
        w = np.asarray(torch_layout)
        old = self.weight
        g = w.T if self.layout == "in_out" and w.ndim == 2 else w
        g = np.ascontiguousarray(g.astype(old.dtype, copy=False))
        c = gs.Constant(name or f"{self.weight_const.name}_heart{_uid()}", g)
        self.node.inputs[1] = c
        self.weight_const, self.weight_ops = c, []

    def set_bias(self, values: np.ndarray, name: str | None = None) -> None:
        """Give the layer a new bias (a new constant; raises if the layer has none)."""
        gs = _gs()
        if self.bias_node is None or self.bias_index is None:
            raise UnsupportedGraph(f"{self.op} node {self.node.name!r} has no bias to replace")
        old = self.bias
        v = np.asarray(values)
        if old is not None:
            v = v.reshape((1,) * (old.ndim - 1) + (-1,)) if old.ndim > 1 else v
            v = v.astype(old.dtype, copy=False)
        c = gs.Constant(name or f"{getattr(self.bias_const, 'name', 'bias')}_heart{_uid()}", np.ascontiguousarray(v))
        self.bias_node.inputs[self.bias_index] = c
        self.bias_const = c


_COUNTER = [0]


def _uid() -> int:
    _COUNTER[0] += 1
    return _COUNTER[0]


def _np_dtype(onnx_type: int) -> Any:
    return {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64}.get(int(onnx_type), np.float32)


def as_linear(node: Any) -> Linear | None:
    """The :class:`Linear` view of ``node`` if it is a MatMul/Gemm/Conv/ConvTranspose with a constant weight."""
    if node.op not in ("MatMul", "Gemm", "Conv", "ConvTranspose") or len(node.inputs) < 2:
        return None
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return None
    if _resolve_const(node.inputs[0]) is not None and node.op in ("MatMul", "Gemm"):
        return None  # constant on the left (x^T-style): not a layer we rewrite
    r = _resolve_const(node.inputs[1])
    if r is None:
        return None
    c, chain = r
    meta = const_meta(c)
    if meta is None or meta[1].kind != "f" or len(meta[0]) < 2:
        return None
    vshape = meta[0]
    if node.op in ("MatMul", "Gemm") and len(vshape) != 2:
        return None
    layout = "in_out" if node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0)) else "out_in"
    lin = Linear(node=node, weight_const=c, weight_ops=chain, layout=layout, output=node.outputs[0])
    if node.op in ("Gemm", "Conv", "ConvTranspose"):
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            rb = _resolve_const(node.inputs[2])
            if rb is not None:
                lin.bias_const, lin.bias_node, lin.bias_index = rb[0], node, 2
        return lin
    out = node.outputs[0]
    if len(out.outputs) == 1 and out.outputs[0].op == "Add":
        add = out.outputs[0]
        for i, t in enumerate(add.inputs):
            if t is out:
                continue
            rb = _resolve_const(t)
            if rb is not None:
                bm = const_meta(rb[0])
                if bm is not None and _volume(bm[0]) == vshape[1] and tuple(bm[0][-1:]) == (vshape[1],):
                    lin.bias_const, lin.bias_node, lin.bias_index, lin.output = rb[0], add, i, add.outputs[0]
    return lin


def find_linear_layers(graph: Any) -> list[Linear]:
    """Every MatMul/Gemm/Conv/ConvTranspose whose weight is a constant, in graph order."""
    out = []
    for n in graph.nodes:
        lin = as_linear(n)
        if lin is not None:
            out.append(lin)
    return out


def weight_sha(values: np.ndarray) -> str:
    """sha256 of ``values`` as float32 C-order bytes (same as ``heart_onnx.models.fingerprint.weight_sha``)."""
    a = np.ascontiguousarray(np.asarray(values, dtype=np.float32))
    return hashlib.sha256(a.tobytes(order="C")).hexdigest()


def find_initializer_by_sha(graph: Any, sha: str) -> tuple[Any, bool] | None:
    """The constant whose values hash to ``sha`` (PyTorch layout): ``(constant, transposed)`` or None.

    ``transposed`` is True when the stored 2-D constant is the transpose of the PyTorch weight
    (MatMul layout). Hashes are cached on the graph object, so repeated look-ups are cheap.
    """
    table = getattr(graph, "_heart_sha_table", None)
    if table is None:
        table = {}
        seen: set[int] = set()
        for t in _all_constants(graph):
            if id(t) in seen:
                continue
            seen.add(id(t))
            v = const_value(t)
            if v is None or v.dtype.kind != "f" or v.ndim == 0 or v.size < 2:
                continue
            table.setdefault(weight_sha(v), (t, False))
            if v.ndim == 2:
                table.setdefault(weight_sha(v.T), (t, True))
        try:
            graph._heart_sha_table = table
        except AttributeError:
            pass
    return table.get(sha)


def find_linear_by_sha(graph: Any, sha: str, linears: Sequence[Linear] | None = None) -> Linear | None:
    """The :class:`Linear` whose PyTorch-layout weight hashes to ``sha``, or None."""
    for lin in linears if linears is not None else find_linear_layers(graph):
        try:
            if weight_sha(lin.torch_weight()) == sha:
                return lin
        except Exception:  # noqa: BLE001 - unreadable constant
            continue
    return None


def _all_constants(graph: Any) -> Iterable[Any]:
    gs = _gs()
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            yield t
    for n in graph.nodes:
        if n.op == "Constant" and n.outputs:
            v = n.attrs.get("value")
            if isinstance(v, gs.Constant):
                yield v


# ============================================================================ attention blocks
@dataclass(eq=False)
class Carrier:
    """A constant that carries the head count, the attention width or the sequence length.

    ``node.inputs[index]`` is the constant (``kind="shape"``: a 1-D shape vector, possibly one piece
    of a ``Concat``; ``kind="tensor"``: a mask/rotary tensor). ``roles`` maps an entry index (shape)
    or an axis (tensor) to ``"heads"``, ``"width"`` (H*Dh), ``"seq"``, ``"batch_heads"`` (B*H with a
    static batch), ``"head_dim"``, ``"qkv"`` (the 3 of a fused projection) or ``"qkv_head_dim"``
    (3*Dh). ``ambiguous`` lists entries whose value fits several roles and whose position did not
    decide (surgery must refuse to guess). ``replace(values)`` installs a new constant.
    """

    node: Any
    index: int
    values: np.ndarray
    kind: Literal["shape", "tensor"]
    roles: dict[int, str] = field(default_factory=dict)
    ambiguous: dict[int, tuple[str, ...]] = field(default_factory=dict)
    target: Any = None  # the Reshape/Expand this shape piece ends up in (kind="shape")

    def positions(self, role: str) -> list[int]:
        return sorted(i for i, r in self.roles.items() if r == role)

    def replace(self, values: np.ndarray) -> None:
        gs = _gs()
        v = np.asarray(values).astype(self.values.dtype, copy=False)
        self.node.inputs[self.index] = gs.Constant(f"{self.node.name}_in{self.index}_heart{_uid()}", np.ascontiguousarray(v))
        self.values = v


@dataclass(eq=False)
class AttentionBlock:
    """One multi-head attention block (see the module docstring). Nodes are onnx-graphsurgeon objects."""

    layer: int
    heads: int
    head_dim: int
    seq_len: int | None
    layout: Layout
    hidden: int  # width of the block input (in_features of the projections)
    softmax: Any
    qk: Any  # MatMul(q, k^T)
    av: Any  # MatMul(probs, v)
    q: Linear
    k: Linear
    v: Linear  # the same Linear three times for a fused projection
    out_proj: Linear
    qkv_reshapes: list = field(default_factory=list)  # first Reshape after each projection
    out_transpose: Any = None  # Transpose of the context before the merge Reshape
    out_reshape: Any = None  # Reshape of the context to (B, N, H*Dh)
    carriers: list = field(default_factory=list)
    region: list = field(default_factory=list)  # nodes between the projections and out_proj (graph order)
    block_input: Any = None  # residual-stream tensor entering the block
    attn_residual: Any = None  # output of the Add(residual, attention branch) (pre-norm/post-norm), if found
    block_output: Any = None  # residual-stream tensor leaving the block (after the MLP), if found
    norm: Literal["pre", "post", "parallel", "unknown"] = "unknown"

    # names the head pass already uses
    @property
    def index(self) -> int:
        return self.layer

    @property
    def proj(self) -> Any:
        return self.out_proj.node

    @property
    def fused(self) -> bool:
        return self.q is self.k is self.v

    @property
    def projections(self) -> list[Linear]:
        return [self.q] if self.fused else [self.q, self.k, self.v]

    @property
    def attn_out(self) -> Any:
        """The attention branch output (after the output projection's bias)."""
        return self.out_proj.output

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def head_carriers(self) -> list[Carrier]:
        return [c for c in self.carriers if any(r in ("heads", "width", "batch_heads") for r in c.roles.values())]

    def seq_carriers(self) -> list[Carrier]:
        return [c for c in self.carriers if "seq" in c.roles.values()]

    def summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "heads": self.heads, "head_dim": self.head_dim, "seq_len": self.seq_len,
                "layout": self.layout, "hidden": self.hidden, "norm": self.norm}


def _walk_back_to_score(sm: Any) -> Any | None:
    frontier, seen = [sm.inputs[0]], set()
    for _ in range(8):
        nxt = []
        for t in frontier:
            n = _producer(t)
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            if n.op == "MatMul" and not any(_is_const(i) for i in n.inputs):
                return n
            if n.op in _SCORE_BACK:
                nxt.extend(i for i in n.inputs if not _is_const(i))
        if not nxt:
            return None
        frontier = nxt
    return None


def _walk_fwd_to_context(sm: Any) -> Any | None:
    frontier, seen = [sm.outputs[0]], set()
    for _ in range(6):
        nxt = []
        for t in frontier:
            for c in t.outputs:
                if id(c) in seen:
                    continue
                seen.add(id(c))
                if c.op == "MatMul" and c.inputs and c.inputs[0] is t and not _is_const(c.inputs[1]):
                    return c
                if c.op in _PROBS_FWD:
                    nxt.extend(c.outputs)
        if not nxt:
            return None
        frontier = nxt
    return None


def _data_inputs(n: Any) -> list:
    idx = _DATA_INPUTS.get(n.op)
    if idx is not None:
        return [n.inputs[i] for i in idx if i < len(n.inputs) and n.inputs[i] is not None]
    if n.op in _ELEMENTWISE:
        return [i for i in n.inputs if i is not None and not _is_const(i)]
    return []


def _walk_back_to_linears(t: Any, limit: int = 400) -> tuple[list[Linear], list]:
    """Linear layers reached walking back from ``t`` through data inputs; also the path nodes."""
    found: dict[int, Linear] = {}
    seen: set[int] = set()
    path: list = []
    stack = [t]
    while stack and len(seen) < limit:
        cur = stack.pop()
        n = _producer(cur)
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if n.op in ("MatMul", "Gemm"):
            lin = as_linear(n)
            if lin is not None:
                found[id(n)] = lin
            continue
        if n.op in _STOP:
            continue
        ins = _data_inputs(n)
        if ins:
            path.append(n)
        stack.extend(ins)
    return list(found.values()), path


def _walk_fwd_to_linear(t: Any, limit: int = 60) -> Linear | None:
    seen: set[int] = set()
    queue = [t]
    passes = {"Transpose", "Reshape", "Identity", "Cast", "Mul", "Flatten", "Squeeze", "Unsqueeze", "Concat"}
    while queue and len(seen) < limit:
        cur = queue.pop(0)
        for n in cur.outputs:
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op in ("MatMul", "Gemm") and n.inputs and n.inputs[0] is cur:
                lin = as_linear(n)
                if lin is not None:
                    return lin
            if n.op in passes:
                queue.extend(n.outputs)
    return None


def _shape_entries(t: Any) -> list[int | None] | None:
    """Entries of a 1-D shape tensor: constants where known, None where computed at run time."""
    v = const_value(t)
    if v is not None:
        return [int(x) for x in np.asarray(v).reshape(-1)] if v.ndim <= 1 else None
    p = _producer(t)
    if p is not None and p.op == "Concat":
        out: list[int | None] = []
        for piece in p.inputs:
            e = _shape_entries(piece)
            if e is None:
                d = _dims(piece)
                if d is None or len(d) != 1 or d[0] is None:
                    return None
                e = [None] * d[0]
            out.extend(e)
        return out
    if p is not None and p.op in ("Cast", "Identity") and p.inputs:
        return _shape_entries(p.inputs[0])
    d = _dims(t)
    if d is not None and len(d) == 1 and d[0] is not None:
        return [None] * d[0]
    return None


def _first_reshape(t: Any, depth: int = 4) -> Any | None:
    """First Reshape reached from ``t`` through Add (bias)/Identity/Cast."""
    frontier = [t]
    for _ in range(depth):
        nxt = []
        for cur in frontier:
            for n in cur.outputs:
                if n.op == "Reshape" and n.inputs[0] is cur:
                    return n
                if n.op in ("Identity", "Cast") or (n.op == "Add" and any(_is_const(i) for i in n.inputs)):
                    nxt.extend(n.outputs)
        frontier = nxt
    return None


def _known(x: int | None) -> bool:
    return x is not None and x > 0


def _heads_from_reshape(entries: list[int | None] | None, out_dims: list | None, width: int, tail: int) -> tuple[int, int] | None:
    """(H, Dh) from a split-heads reshape whose last ``tail`` entries are [H, Dh] (tail=2) or [3, H, Dh]."""
    cand = []
    for src in (entries, out_dims):
        if src is None or len(src) < 2:
            continue
        h, last = src[-2], src[-1]
        cand.append((h, last))
    for h, last in cand:
        if _known(last) and width % last == 0:
            return width // last, last
        if _known(h) and width % h == 0:
            return h, width // h
    return None


def _classify_layout(lin: Linear, hidden_out: int) -> tuple[Layout, int, int, list] | None:
    """Layout, H, Dh and the split-heads reshapes of a fused projection (``hidden_out`` = 3*H*Dh)."""
    width = hidden_out // 3
    r = _first_reshape(lin.output)
    if r is not None:
        entries = _shape_entries(r.inputs[1])
        od = _dims(r.outputs[0])
        rank = len(entries) if entries is not None else (len(od) if od is not None else 0)
        src = entries if entries is not None else od
        if rank == 5 and src is not None and src[-3] == 3:
            hd = _heads_from_reshape(entries, od, width, 2)
            if hd:
                return "fused_timm", hd[0], hd[1], [r]
        if rank == 4:
            # [B, N, H, 3*Dh]: the last entry is 3*Dh
            for s in (entries, od):
                if s is not None and _known(s[-1]) and s[-1] % 3 == 0 and width % (s[-1] // 3) == 0:
                    dh = s[-1] // 3
                    return "neox_interleaved", width // dh, dh, [r]
                if s is not None and _known(s[-2]) and width % s[-2] == 0:
                    h = s[-2]
                    return "neox_interleaved", h, width // h, [r]
    # fused projection split along its last axis (Split / 3 Slices) then per-part reshapes: [3, H, Dh]
    for n in lin.output.outputs:
        if n.op in ("Split", "Slice"):
            outs = n.outputs if n.op == "Split" else [n.outputs[0]]
            rs = [_first_reshape(o) for o in outs]
            rs = [x for x in rs if x is not None]
            if rs:
                hd = _heads_from_reshape(_shape_entries(rs[0].inputs[1]), _dims(rs[0].outputs[0]), width, 2)
                if hd:
                    return "fused_timm", hd[0], hd[1], rs
    return None


def find_attention_blocks(graph: Any, require_blocks: bool = False) -> list[AttentionBlock]:
    """Every multi-head attention block of ``graph`` (a ``gs.Graph``) in layer order.

    - ``require_blocks``: default False; True raises ``UnsupportedGraph`` when the graph has none.
    Raises ``UnsupportedGraph`` when a block is found but does not have the expected structure.
    """
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    blocks: list[AttentionBlock] = []
    for sm in [n for n in graph.nodes if n.op == "Softmax"]:
        qk = _walk_back_to_score(sm)
        av = _walk_fwd_to_context(sm) if qk is not None else None
        if qk is None or av is None:
            continue  # a Softmax that is not attention (e.g. a classifier head)
        layer = len(blocks)
        where = f"attention layer {layer} (Softmax {sm.name!r})"
        qs, qpath = _walk_back_to_linears(qk.inputs[0])
        ks, kpath = _walk_back_to_linears(qk.inputs[1])
        vs, vpath = _walk_back_to_linears(av.inputs[1])
        for what, found in (("q", qs), ("k", ks), ("v", vs)):
            if len(found) != 1:
                raise UnsupportedGraph(f"{where}: expected one MatMul/Gemm with a constant weight producing {what}, "
                                       f"found {len(found)}: export the model with heart-onnx export "
                                       "(dynamo or torchscript) without quantization or fused attention ops")
        q, k, v = qs[0], ks[0], vs[0]
        out = _walk_fwd_to_linear(av.outputs[0])
        if out is None:
            raise UnsupportedGraph(f"{where}: expected the context (probs @ v) to reach an output projection "
                                   "MatMul/Gemm through Transpose/Reshape, found none")
        width = out.in_features
        hidden = q.in_features
        if q.node is k.node is v.node:
            k = v = q  # one Linear object for a fused projection
            lay = _classify_layout(q, q.out_features)
            if lay is None:
                raise UnsupportedGraph(f"{where}: fused qkv projection ({q.out_features} outputs) is not followed by a "
                                       "Reshape to [B, N, 3, H, Dh] or [B, N, H, 3*Dh]")
            layout, heads, head_dim, reshapes = lay
        elif len({id(q.node), id(k.node), id(v.node)}) == 3:
            layout = "separate"
            reshapes = [r for r in (_first_reshape(x.output) for x in (q, k, v)) if r is not None]
            hd = None
            if reshapes:
                hd = _heads_from_reshape(_shape_entries(reshapes[0].inputs[1]), _dims(reshapes[0].outputs[0]),
                                         q.out_features, 2)
            if hd is None:
                raise UnsupportedGraph(f"{where}: separate q/k/v projections but no Reshape to [B, N, H, Dh] after q")
            heads, head_dim = hd
        else:
            raise UnsupportedGraph(f"{where}: q, k and v share only part of a projection (expected one fused or three "
                                   "separate MatMul/Gemm)")
        if heads * head_dim != width or (layout != "separate" and q.out_features != 3 * width):
            raise UnsupportedGraph(f"{where}: {heads} heads x {head_dim} = {heads * head_dim} does not match the output "
                                   f"projection's {width} inputs")
        smd = _dims(sm.outputs[0])
        seq = None
        if smd and len(smd) >= 2:
            seq = smd[-1] if smd[-1] is not None else smd[-2]
        blk = AttentionBlock(layer=layer, heads=heads, head_dim=head_dim, seq_len=seq, layout=layout, hidden=hidden,
                             softmax=sm, qk=qk, av=av, q=q, k=k, v=v, out_proj=out, qkv_reshapes=reshapes)
        _fill_region(blk, order)
        _fill_output_nodes(blk)
        _fill_carriers(blk)
        _fill_residual(blk, graph, order)
        blocks.append(blk)
    blocks.sort(key=lambda b: order.get(id(b.softmax), 0))
    for i, b in enumerate(blocks):
        b.layer = i
    if require_blocks and not blocks:
        raise UnsupportedGraph("no attention block (Softmax between two computed MatMuls) in this graph: "
                               "is it a transformer exported with heart-onnx export?")
    return blocks


def _reach(starts: Iterable[Any], forward: bool, stop: set) -> set:
    seen: set = set()
    stack = list(starts)
    while stack:
        t = stack.pop()
        for n in (t.outputs if forward else t.inputs):
            if id(n) in seen or id(n) in stop:
                continue
            seen.add(id(n))
            stack.extend(n.outputs if forward else [i for i in n.inputs if i is not None])
    return seen


def _fill_region(blk: AttentionBlock, order: dict) -> None:
    projs = blk.projections
    starts = [p.output for p in projs]
    fwd = _reach(starts, True, {id(blk.out_proj.node)})
    bwd = _reach([blk.out_proj.node.inputs[0]], False, {id(p.node) for p in projs} | {id(p.bias_node) for p in projs})
    # shape subgraphs (Shape -> Gather -> Concat -> Reshape) hang off the region: keep them too
    nodes = {i for i in fwd if i in bwd}
    blk.region = sorted((n for n in _nodes_by_id(starts, fwd) if id(n) in nodes), key=lambda n: order.get(id(n), 0))


def _nodes_by_id(starts: Iterable[Any], ids: set) -> list:
    out, seen, stack = [], set(), list(starts)
    while stack:
        t = stack.pop()
        for n in t.outputs:
            if id(n) in ids and id(n) not in seen:
                seen.add(id(n))
                out.append(n)
                stack.extend(n.outputs)
    return out


def _fill_output_nodes(blk: AttentionBlock) -> None:
    t = blk.out_proj.node.inputs[0]
    for _ in range(4):
        p = _producer(t)
        if p is None:
            break
        if p.op == "Reshape" and blk.out_reshape is None:
            blk.out_reshape = p
        elif p.op == "Transpose" and blk.out_transpose is None:
            blk.out_transpose = p
            break
        elif p.op not in ("Identity", "Cast", "Reshape"):
            break
        t = p.inputs[0]


_SHAPE_SLOT = {"Reshape": 1, "Expand": 1, "Tile": 1, "ConstantOfShape": 0}


def _template(node: Any, rank: int, layout: Layout) -> dict[int, str]:
    """Role of each entry of a Reshape target by position (used only to settle value collisions)."""
    src = node.inputs[0] if node.inputs else None
    in_rank = len(src.shape) if getattr(src, "shape", None) is not None else None
    via_transpose = _producer(src) is not None and _producer(src).op == "Transpose"
    if rank == 5:
        return {1: "seq", 2: "qkv", 3: "heads", 4: "head_dim"}
    if rank == 4:
        if in_rank == 3 and via_transpose:
            return {1: "heads", 2: "head_dim", 3: "seq"}
        if in_rank == 3:
            return {1: "seq", 2: "heads", 3: "qkv_head_dim" if layout == "neox_interleaved" else "head_dim"}
        return {1: "heads", 2: "seq", 3: "head_dim"}
    if rank == 3:
        if in_rank == 4 and via_transpose and tuple(_producer(src).attrs.get("perm", ())) == (0, 2, 1, 3):
            return {1: "seq", 2: "width"}
        return {0: "batch_heads", 1: "seq", 2: "head_dim"}
    return {}


def _classify(values: Sequence[int | None], offset: int, full_rank: int, node: Any, blk: AttentionBlock,
              batch: int | None) -> tuple[dict[int, str], dict[int, tuple[str, ...]]]:
    H, Dh, N = blk.heads, blk.head_dim, blk.seq_len
    by_value: dict[str, int] = {"heads": H, "width": H * Dh, "head_dim": Dh}
    if N:
        by_value["seq"] = N
    if blk.layout == "fused_timm":
        by_value["qkv"] = 3
    if blk.layout == "neox_interleaved":
        by_value["qkv_head_dim"] = 3 * Dh
    if batch and batch > 1:
        by_value["batch_heads"] = batch * H
    tmpl = _template(node, full_rank, blk.layout)
    roles, amb = {}, {}
    for j, val in enumerate(values):
        if val is None or val <= 0:
            continue
        cands = tuple(sorted(r for r, x in by_value.items() if x == val))
        if not cands:
            continue
        pos = offset + j
        if len(cands) == 1:
            role = cands[0]
        elif tmpl.get(pos) in cands:
            role = tmpl[pos]
        else:
            amb[j] = cands
            continue
        if role in ("heads", "width", "seq", "batch_heads", "head_dim", "qkv", "qkv_head_dim"):
            roles[j] = role
    return roles, amb


def _fill_carriers(blk: AttentionBlock) -> None:
    batch = None
    d = _dims(blk.av.outputs[0])
    if d and d[0] is not None:
        batch = d[0]
    carriers: list[Carrier] = []
    seen: set = set()
    for n in blk.region:
        slot = _SHAPE_SLOT.get(n.op)
        if slot is not None and len(n.inputs) > slot:
            src = n.inputs[slot]
            v = const_value(src)
            entries = _shape_entries(src)
            full_rank = len(entries) if entries is not None else 0
            if v is not None and v.ndim == 1:
                roles, amb = _classify([int(x) for x in v], 0, full_rank, n, blk, batch)
                if roles or amb:
                    carriers.append(Carrier(n, slot, v, "shape", roles, amb, target=n))
            else:
                cat = _producer(src)
                if cat is not None and cat.op == "Concat":
                    off = 0
                    for j, piece in enumerate(cat.inputs):
                        pv = const_value(piece)
                        pe = _shape_entries(piece)
                        ln = len(pe) if pe is not None else 1
                        if pv is not None and pv.ndim <= 1:
                            vals = [int(x) for x in pv.reshape(-1)]
                            roles, amb = _classify(vals, off, full_rank, n, blk, batch)
                            if (roles or amb) and (id(cat), j) not in seen:
                                seen.add((id(cat), j))
                                carriers.append(Carrier(cat, j, pv, "shape", roles, amb, target=n))
                        off += ln
            continue
        # constant tensors with a sequence axis (masks, rotary tables) feeding the block
        if blk.seq_len and n.op in ("Add", "Mul", "Where", "Sub"):
            for j, t in enumerate(n.inputs):
                v = const_value(t)
                if v is None or v.ndim < 2 or v.size <= 1:
                    continue
                axes = {a: "seq" for a in range(v.ndim) if v.shape[a] == blk.seq_len and v.shape[a] > 1}
                if axes:
                    carriers.append(Carrier(n, j, v, "tensor", axes))
    # the mask/scale ops between the score MatMul and the Softmax are not in the region
    if blk.seq_len:
        t = blk.softmax.inputs[0]
        for _ in range(4):
            p = _producer(t)
            if p is None or p is blk.qk:
                break
            for j, x in enumerate(p.inputs):
                v = const_value(x)
                if v is not None and v.ndim >= 2 and v.size > 1:
                    axes = {a: "seq" for a in range(v.ndim) if v.shape[a] == blk.seq_len}
                    if axes:
                        carriers.append(Carrier(p, j, v, "tensor", axes))
            nxt = [x for x in p.inputs if not _is_const(x)]
            if not nxt:
                break
            t = nxt[0]
    uniq, keys = [], set()
    for c in carriers:
        key = (id(c.node), c.index)
        if key not in keys:
            keys.add(key)
            uniq.append(c)
    blk.carriers = uniq


def _upstream_has(t: Any, targets: set, limit: int = 300) -> bool:
    """True if any node in ``targets`` (ids) is an ancestor of tensor ``t`` (bounded search)."""
    seen: set = set()
    stack = [t]
    while stack and len(seen) < limit:
        cur = stack.pop()
        p = _producer(cur)
        if p is None or id(p) in seen:
            continue
        if id(p) in targets:
            return True
        seen.add(id(p))
        stack.extend(i for i in p.inputs if i is not None and not _is_const(i))
    return False


def _fill_residual(blk: AttentionBlock, graph: Any, order: dict) -> None:
    """Block input, the attention residual and the block output on the residual stream (best effort)."""
    a = blk.q.node.inputs[0]
    p = _producer(a)
    x_in = a
    if p is not None and p.op in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization") \
            and len(p.inputs[0].outputs) > 1:
        x_in = p.inputs[0]  # pre-norm: the stream feeds the norm and the residual Add
    blk.block_input = x_in
    mine = order.get(id(blk.softmax), 0)
    later = {id(n) for n in graph.nodes if n.op == "Softmax" and order.get(id(n), 0) > mine}

    def residual_add(t: Any) -> Any | None:
        for c in t.outputs:
            if c.op != "Add" or len(c.inputs) != 2:
                continue
            other = c.inputs[1] if c.inputs[0] is t else c.inputs[0]
            if _is_const(other) or _upstream_has(other, later):  # a bias, or the next block's branch
                continue
            return c
        return None

    first = residual_add(blk.attn_out)
    if first is None:
        return
    other = first.inputs[1] if first.inputs[0] is blk.attn_out else first.inputs[0]
    t = first.outputs[0]
    if other is x_in:
        blk.attn_residual = t
        if len(t.outputs) == 1 and t.outputs[0].op == "LayerNormalization":  # post-norm (BERT)
            blk.norm = "post"
            ln = t.outputs[0].outputs[0]
            nxt = residual_add(ln)
            if nxt is None:
                blk.block_output = ln
                return
            out = nxt.outputs[0]
            ok = len(out.outputs) == 1 and out.outputs[0].op == "LayerNormalization"
            blk.block_output = out.outputs[0].outputs[0] if ok else out
            return
        blk.norm = "pre"
        nxt = residual_add(t)
        blk.block_output = nxt.outputs[0] if nxt is not None else None
        return
    nxt = residual_add(t)  # parallel residual (GPT-NeoX): attn + mlp, then + block input
    if nxt is not None and any(x is x_in for x in nxt.inputs):
        blk.norm = "parallel"
        blk.block_output = nxt.outputs[0]


# ============================================================================ graph import / exporter
def import_graph(model: Any, infer_shapes: bool = True, base_dir: str | None = None,
                 shapes: dict[str, tuple[Any, list]] | None = None) -> Any:
    """``gs.Graph`` of ``model`` with every tensor's shape filled by ONNX shape inference (data propagation).

    Shape inference runs on a light copy without the big initializers' data, so it is cheap and
    works for models over 2 GB. The model itself is not modified.

    - ``shapes``: default None; the result of :func:`infer_value_shapes` if already computed.
    """
    gs = _gs()
    graph = gs.import_onnx(model)
    if infer_shapes:
        shapes = shapes if shapes is not None else infer_value_shapes(model, {}, base_dir)
        for name, t in graph.tensors().items():
            if isinstance(t, gs.Variable) and name in shapes:
                dtype, shape = shapes[name]
                if t.shape is None or any(not isinstance(d, (int, np.integer)) for d in (t.shape or ())):
                    t.shape = shape
                if t.dtype is None and dtype is not None:
                    t.dtype = dtype
    return graph


def light_model(model: Any, keep_elements: int = 64) -> Any:
    """A copy of ``model`` whose initializers over ``keep_elements`` elements keep dims but no data."""
    from ..onnx_io import light_model as _light

    return _light(model, keep_elements)


def _collect(inferred: Any) -> dict[str, tuple[Any, list]]:
    from onnx import helper

    out: dict[str, tuple[Any, list]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        try:
            dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
        except Exception:  # noqa: BLE001
            dtype = None
        out[vi.name] = (dtype, shape)
    return out


def _n_known(shape: list) -> int:
    return sum(isinstance(d, int) for d in shape)


def _resolved(shape: list | None, pinned: dict | None = None) -> bool:
    """Every dim known: an int or a named input dim that is not pinned (not ONNX's ``unk__N`` placeholders)."""
    return shape is not None and all(
        isinstance(d, int) or (isinstance(d, str) and not d.startswith("unk__") and d not in (pinned or {}))
        for d in shape)


def _static(shape: list | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def infer_value_shapes(model: Any, fixed_dims: dict[str, int] | None = None,
                       base_dir: str | None = None) -> dict[str, tuple[Any, list]]:
    """name -> (numpy dtype or None, shape list with ints / dim_param strings / None) for every value.

    - ``fixed_dims``: default None; symbolic input dims to pin, by name (e.g. ``{"batch": 1}``).
    - ``base_dir``: default None; folder of the model's external data, read only when the fallback
      below needs weights.
    ONNX shape inference (data propagation on) runs first on a light copy; when some node outputs
    stay unknown (Slices with computed bounds, as TorchScript's rotary code has), onnxruntime's
    symbolic shape inference fills them (it needs the weights; skipped over 2 GB).
    """
    import onnx

    light = light_model(model)
    if fixed_dims:  # pin the dims everywhere the file records them (inputs, outputs, value_info)
        for vi in (*light.graph.input, *light.graph.output, *light.graph.value_info):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param in fixed_dims:
                    d.dim_value = int(fixed_dims[d.dim_param])
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; fall back to what the file records
        inferred = light
    out = _collect(inferred)
    missing = [o for n in model.graph.node for o in n.output[:1] if n.op_type not in ("Constant",)
               and not _resolved(out.get(o, (None, None))[1], fixed_dims)]
    if missing and (fixed_dims is not None or not any(True for vi in model.graph.input
                                                      for d in vi.type.tensor_type.shape.dim if d.dim_param)):
        more = _symbolic_shapes(model, fixed_dims or {}, base_dir)
        for k, v in more.items():
            cur = out.get(k, (None, None))[1]
            if v[1] is not None and (cur is None or _n_known(v[1]) > _n_known(cur)):
                out[k] = v
    return out


def _symbolic_shapes(model: Any, fixed_dims: dict[str, int], base_dir: str | None) -> dict[str, tuple[Any, list]]:
    import contextlib
    import io
    import logging

    import onnx

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except Exception:  # noqa: BLE001 - onnxruntime or sympy missing
        return {}
    external = [t for t in model.graph.initializer if t.data_location == 1]
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > 2**31 - 2**27 or (external and base_dir is None):
        return {}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        if external:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(copy, base_dir)
        for vi in copy.graph.input:
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param in fixed_dims:
                    d.dim_value = int(fixed_dims[d.dim_param])
        del copy.graph.value_info[:]
        logging.getLogger("onnxruntime").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            inferred = SymbolicShapeInference.infer_shapes(copy, auto_merge=True, guess_output_rank=False)
    except Exception:  # noqa: BLE001 - best effort
        return {}
    return _collect(inferred) if inferred is not None else {}


def detect_exporter(model: Any) -> Exporter:
    """``"dynamo"`` / ``"torchscript"`` / ``"unknown"``: metadata ``heart_onnx.exporter`` first, else hints.

    Hints: dynamo names nodes ``node_*`` and records ``pkg.torch.onnx.*`` node metadata; TorchScript
    names nodes by module scope (``/blocks/blocks.0/attn/...``) and emits ``Constant`` nodes.
    """
    for p in model.metadata_props:
        if p.key == "heart_onnx.exporter" and p.value in ("dynamo", "torchscript"):
            return p.value  # type: ignore[return-value]
    if model.producer_name not in ("pytorch", "heart-onnx"):
        return "unknown"
    dyn = ts = 0
    for n in model.graph.node[:400]:
        if n.name.startswith("node_") or any(m.key.startswith("pkg.torch.onnx") for m in n.metadata_props):
            dyn += 1
        elif n.name.startswith("/") or (n.op_type in ("Constant", "Identity") and n.name.startswith(("Constant_", "Identity_"))):
            ts += 1
    if dyn > ts:
        return "dynamo"
    if ts > dyn:
        return "torchscript"
    return "unknown"


def match_model(model: Any, require_blocks: bool = False) -> tuple[Any, list[AttentionBlock]]:
    """Import ``model`` (shapes inferred) and find its attention blocks: ``(graph, blocks)``."""
    graph = import_graph(model)
    try:
        return graph, find_attention_blocks(graph, require_blocks=require_blocks)
    except HeartError:
        raise
    except RecursionError:
        raise UnsupportedGraph("graph too deep to match attention blocks") from None
