"""FLOPs and parameters of an ONNX graph, counted op by op from inferred static shapes (no torch).

    rep = graph_flops(model)            # symbolic dims (batch, seq) pinned to 1 unless given
    rep = graph_flops(model, dims={"batch": 1, "seq": 128})
    rep.macs, rep.flops, rep.by_op, rep.params

Conventions (so numbers compare with analytic counts such as ViT-B/16 = 17.6 GMACs):

- 1 MAC = 2 FLOPs. MAC-counted ops: ``MatMul`` (weights and attention alike; attention MatMuls, both
  inputs computed, are also reported as ``attention_macs``), ``Gemm`` (M*N*K), ``Conv``
  (output elements x Cin/group x kernel), ``ConvTranspose`` (input elements x Cout/group x kernel),
  ``Einsum`` is not counted (listed in ``uncounted``).
- Everything else that computes (``Add``, ``Mul``, ``Erf``, ``Softmax``, ``LayerNormalization``, pools,
  reductions, ...) counts 1 FLOP per output element (reductions and pools: per input element),
  reported separately as ``elementwise_flops`` so MAC-based totals stay comparable. Gemm and Conv
  biases count here too. Data movement (Reshape, Transpose, Gather, Concat, Slice, Cast, ...) is 0.
- Symbolic input dims (a dynamic batch or sequence) are pinned to 1 unless ``dims`` names them;
  every pinned dim is listed in ``assumptions``. Nodes whose shapes stay unknown are listed in
  ``unknown`` and count 0. Nodes inside ``If``/``Loop`` subgraphs are not counted.
- ``params``: elements of floating-point initializers and ``Constant`` node tensors with more than one
  element (scalars such as a GELU's 0.5 or an attention scale are not parameters), each tensor once
  by name. An exporter may store equal tensors once (TorchScript de-duplicates the zero biases of a
  random-init model), so the count can be lower than PyTorch's. Integer constants (shapes, indices) are ``int_constants``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

MAC_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
_ZERO = {
    "Reshape", "Transpose", "Gather", "GatherElements", "GatherND", "Concat", "Slice", "Split", "Squeeze",
    "Unsqueeze", "Cast", "Shape", "Size", "Identity", "Constant", "ConstantOfShape", "Expand", "Flatten",
    "Range", "Tile", "Pad", "Dropout", "ScatterND", "ScatterElements", "NonZero", "TopK", "Resize",
    "DepthToSpace", "SpaceToDepth", "CastLike", "OneHot", "Trilu", "EyeLike", "If", "Loop", "Scan",
    "QuantizeLinear", "DequantizeLinear", "ArgMax", "ArgMin",
}
_PER_INPUT = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
              "ReduceSumSquare", "ReduceLogSumExp", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}


@dataclass
class FlopsReport:
    """FLOPs of one graph (see the module docstring for what is counted)."""

    macs: int = 0  # MatMul/Gemm/Conv/ConvTranspose multiply-accumulates
    attention_macs: int = 0  # the part of ``macs`` from MatMuls with two computed inputs
    elementwise_flops: int = 0  # 1 per output element of every other computing op
    macs_by_op: dict = field(default_factory=dict)
    elementwise_by_op: dict = field(default_factory=dict)
    params: int = 0
    int_constants: int = 0
    assumptions: list = field(default_factory=list)
    unknown: list = field(default_factory=list)  # op types (with counts) whose shapes were unknown
    uncounted: list = field(default_factory=list)  # op types not modelled

    @property
    def flops(self) -> int:
        """Total: 2 x MACs + elementwise."""
        return 2 * self.macs + self.elementwise_flops

    @property
    def mac_flops(self) -> int:
        return 2 * self.macs

    @property
    def by_op(self) -> dict:
        """FLOPs per op type (MAC ops as 2 x MACs, plus their bias adds)."""
        out: dict[str, int] = {}
        for k, v in self.macs_by_op.items():
            out[k] = out.get(k, 0) + 2 * v
        for k, v in self.elementwise_by_op.items():
            out[k] = out.get(k, 0) + v
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(flops=self.flops, mac_flops=self.mac_flops, by_op=self.by_op)
        return d


def _numel(shape: Any) -> int | None:
    if shape is None:
        return None
    n = 1
    for d in shape:
        if not isinstance(d, int) or d < 0:
            return None
        n *= d
    return n


def _is_float(data_type: int) -> bool:
    return data_type in (1, 10, 11, 16, 17, 18, 19, 20)


def graph_flops(model: Any, dims: Mapping[str, int] | None = None, default_dim: int = 1,
                base_dir: str | None = None, shapes_out: dict | None = None) -> FlopsReport:
    """Count FLOPs/MACs/params of an ``onnx.ModelProto`` (external data need not be loaded).

    - ``dims``: default None; values for symbolic input dims by name, e.g. ``{"batch": 1, "seq": 128}``.
    - ``default_dim``: default 1; value for any other symbolic input dim (listed in ``assumptions``).
    - ``base_dir``: default None; folder of external data (read only if shape inference needs weights).
    - ``shapes_out``: default None; a dict that receives the inferred value shapes (to reuse them).
    """
    from .surgery.match import infer_value_shapes

    rep = FlopsReport()
    fixed = dict(dims or {})
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                continue
            name = d.dim_param or f"{vi.name}[{i}]"
            if name not in fixed:
                fixed[name] = default_dim
                rep.assumptions.append(f"symbolic dim {name!r} of input {vi.name!r} taken as {default_dim}")
    # unnamed symbolic dims cannot be pinned by name: give them names first (on the light copy)
    shapes = infer_value_shapes(_named_dims(model, fixed), fixed_dims=fixed, base_dir=base_dir)
    if shapes_out is not None:
        shapes_out.update(shapes)
    init_shapes = {t.name: list(t.dims) for t in model.graph.initializer}

    def shape(name: str) -> list | None:
        if name in init_shapes:
            return init_shapes[name]
        s = shapes.get(name)
        return s[1] if s else None

    const_names = set(init_shapes)
    seen: set[str] = set()
    for t in model.graph.initializer:
        if t.name in seen:
            continue
        seen.add(t.name)
        n = math.prod(t.dims) if t.dims else 1
        if _is_float(t.data_type) and n > 1:
            rep.params += n
        elif not _is_float(t.data_type):
            rep.int_constants += n
    unknown: dict[str, int] = {}
    uncounted: dict[str, int] = {}
    for node in model.graph.node:
        op = node.op_type
        if op == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    n = math.prod(a.t.dims) if a.t.dims else 1
                    if _is_float(a.t.data_type) and n > 1:
                        rep.params += n
                    elif not _is_float(a.t.data_type):
                        rep.int_constants += n
            const_names.update(node.output)
            continue
        if op in _ZERO or node.domain not in ("", "ai.onnx"):
            if node.domain not in ("", "ai.onnx"):
                uncounted[f"{node.domain}.{op}"] = uncounted.get(f"{node.domain}.{op}", 0) + 1
            continue
        out = shape(node.output[0]) if node.output else None
        if op in MAC_OPS:
            macs, bias = _mac_count(node, shape, out)
            if macs is None:
                unknown[op] = unknown.get(op, 0) + 1
                continue
            rep.macs += macs
            rep.macs_by_op[op] = rep.macs_by_op.get(op, 0) + macs
            if op == "MatMul" and not any(i in const_names for i in node.input[:2]):
                rep.attention_macs += macs
            if bias:
                rep.elementwise_flops += bias
                rep.elementwise_by_op[f"{op}.bias"] = rep.elementwise_by_op.get(f"{op}.bias", 0) + bias
            continue
        if op == "Einsum":
            uncounted[op] = uncounted.get(op, 0) + 1
            continue
        if op in _PER_INPUT or op in ("AveragePool", "MaxPool", "LpPool"):
            src = shape(node.input[0]) if node.input else None
            n = _numel(src)
            if op in ("AveragePool", "MaxPool", "LpPool"):
                k = [a.ints for a in node.attribute if a.name == "kernel_shape"]
                n = _numel(out)
                n = n * math.prod(k[0]) if n is not None and k else n
        else:
            n = _numel(out)
        if n is None:
            unknown[op] = unknown.get(op, 0) + 1
            continue
        rep.elementwise_flops += n
        rep.elementwise_by_op[op] = rep.elementwise_by_op.get(op, 0) + n
    rep.unknown = [f"{k} x{v}" for k, v in sorted(unknown.items())]
    rep.uncounted = [f"{k} x{v}" for k, v in sorted(uncounted.items())]
    return rep


def _named_dims(model: Any, fixed: dict[str, int]) -> Any:
    """``model`` itself, or a light copy whose unnamed symbolic input dims got the names used in ``fixed``."""
    need = any(not d.HasField("dim_value") and not d.dim_param for vi in model.graph.input
               for d in vi.type.tensor_type.shape.dim)
    if not need:
        return model
    from .surgery.match import light_model

    light = light_model(model)
    for vi in light.graph.input:
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") and not d.dim_param:
                d.dim_param = f"{vi.name}[{i}]"
    return light


def _attr(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            if a.type == 2:
                return a.i
            if a.type == 7:
                return list(a.ints)
            if a.type == 1:
                return a.f
    return default


def _mac_count(node: Any, shape: Any, out: list | None) -> tuple[int | None, int]:
    """(MACs, bias elements) of a MatMul/Gemm/Conv/ConvTranspose; MACs None when shapes are unknown."""
    op = node.op_type
    a = shape(node.input[0]) if len(node.input) > 0 else None
    b = shape(node.input[1]) if len(node.input) > 1 else None
    n_out = _numel(out)
    has_bias = len(node.input) > 2 and node.input[2] != ""
    if op == "MatMul":
        if a is None or n_out is None or not a:
            return None, 0
        k = a[-1]
        if not isinstance(k, int) or k < 0:
            if b is not None and len(b) >= 2 and isinstance(b[-2], int):
                k = b[-2]
            elif b is not None and len(b) == 1 and isinstance(b[0], int):
                k = b[0]
            else:
                return None, 0
        return n_out * k, 0
    if op == "Gemm":
        if a is None or len(a) != 2 or n_out is None:
            return None, 0
        k = a[0] if _attr(node, "transA", 0) else a[1]
        if not isinstance(k, int) or k < 0:
            return None, 0
        return n_out * k, (n_out if has_bias else 0)
    if op == "Conv":
        if b is None or n_out is None or len(b) < 2:
            return None, 0
        if not all(isinstance(x, int) and x >= 0 for x in b):
            return None, 0
        return n_out * math.prod(b[1:]), (n_out if has_bias else 0)
    if op == "ConvTranspose":
        n_in = _numel(a)
        if b is None or n_in is None or len(b) < 2 or not all(isinstance(x, int) for x in b):
            return None, 0
        per_in = b[1] * math.prod(b[2:])  # weight (Cin, Cout/group, k...): each input feeds Cout/group x k
        return n_in * per_in, ((n_out or 0) if has_bias else 0)
    return None, 0
