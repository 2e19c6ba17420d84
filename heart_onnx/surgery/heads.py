"""Remove attention heads from an ONNX graph (onnx-graphsurgeon, no torch).

For each layer with removed heads (kept heads ``k``, ``H' = len(k)``):

- q/k/v projection weights (ONNX ``MatMul`` layout ``(in, out)``; ``Gemm`` either layout) and biases
  keep the output columns of the kept heads. Column layouts: separate q, k, v (HF ViT/DeiT/BERT):
  ``[H, Dh]`` each; fused timm ``qkv``: ``[3, H, Dh]``; GPT-NeoX ``query_key_value``: interleaved
  ``[H, 3, Dh]`` (rotary acts on the first ``rotary_pct*Dh`` dims *within* each head, so slicing whole
  heads keeps it exact);
- the output projection keeps the input rows ``h*Dh:(h+1)*Dh`` of the kept heads;
- every head-count carrier between the projections and the output projection is rewritten:
  ``Reshape``/``Expand`` shape constants (plain or pieces of a ``Concat``) holding ``H`` -> ``H'``,
  ``H*Dh`` -> ``H'*Dh``, ``3*H*Dh`` -> ``3*H'*Dh`` (``-1`` entries re-resolve at run time), and
  ``num_heads`` attributes of fused attention ops;
- all heads removed: the attention branch is deleted; the residual receives the output projection's
  bias (zeros without one), exactly what the masked model computes.

Shared constants (the dynamo exporter de-duplicates equal initializers across layers) are never edited
in place: every rewritten input gets a new constant.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import HeartError, UnsupportedGraph
from ._attn import AttentionBlock, SHAPE_INPUT, bias_add, const_value, gs_mod, rewrite_shape_input, weight_of

Layout = str  # "qkv_head" ([3, H, Dh], timm) or "head_qkv" ([H, 3, Dh], GPT-NeoX) for a fused projection


def head_columns(kept: Sequence[int], num_heads: int, head_dim: int, fused: bool, layout: Layout) -> np.ndarray:
    """Output columns of a q/k/v projection that belong to the ``kept`` heads (int64)."""
    H, Dh = num_heads, head_dim
    per_head = [np.arange(h * Dh, (h + 1) * Dh) for h in kept]
    if not fused:
        return np.concatenate(per_head).astype(np.int64)
    if layout == "head_qkv":  # [H, 3, Dh]
        return np.concatenate([np.arange(h * 3 * Dh, (h + 1) * 3 * Dh) for h in kept]).astype(np.int64)
    return np.concatenate([s * H * Dh + c for s in range(3) for c in per_head]).astype(np.int64)  # [3, H, Dh]


def _head_fn(H: int, Hn: int, Dh: int):
    def fn(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v).copy()
        if v.ndim > 1:
            return v
        flat = v.reshape(-1)
        orig = flat.copy()
        hits = [i for i in range(flat.size) if orig[i] == H]
        if H == Dh and len(hits) > 1:  # [.., H, Dh] with H == Dh: the head axis comes first
            hits = [i for i in hits if not (i > 0 and orig[i - 1] == H and (i - 1) in hits)]
        for i in hits:
            flat[i] = Hn
        for i in range(flat.size):
            if orig[i] == H * Dh and H * Dh != H:
                flat[i] = Hn * Dh
            elif orig[i] == 3 * H * Dh:
                flat[i] = 3 * Hn * Dh
        return flat.reshape(v.shape)

    return fn


def _set_weight(node: Any, keep: np.ndarray, axis_role: str) -> None:
    """Slice the constant weight of ``node``: ``axis_role`` "in" (rows of the reduction axis) or "out"."""
    gs = gs_mod()
    w, in_axis = weight_of(node)
    axis = in_axis if axis_role == "in" else 1 - in_axis
    nw = np.ascontiguousarray(np.take(w, keep, axis=axis))
    node.inputs[1] = gs.Constant(f"{node.name}_w_heart", nw)


def _slice_bias(node: Any, cols: np.ndarray) -> None:
    gs = gs_mod()
    if node.op == "Gemm":
        if len(node.inputs) > 2:
            b = const_value(node.inputs[2])
            if b is not None and b.ndim == 1 and b.size > 1:
                node.inputs[2] = gs.Constant(f"{node.name}_b_heart", np.ascontiguousarray(b[cols]))
        return
    ba = bias_add(node)
    if ba is not None:
        add, i, b = ba
        add.inputs[i] = gs.Constant(f"{add.name}_b_heart", np.ascontiguousarray(b[cols]))


def _remove_branch(graph: Any, blk: AttentionBlock, hidden: int) -> None:
    gs = gs_mod()
    out = blk.attn_out
    bias = None
    if blk.proj.op == "Gemm" and len(blk.proj.inputs) > 2:
        bias = const_value(blk.proj.inputs[2])
    else:
        ba = bias_add(blk.proj)
        bias = ba[2] if ba is not None else None
    w, _ = weight_of(blk.proj)
    if bias is None:
        bias = np.zeros(hidden, dtype=w.dtype)
    c = gs.Constant(f"{blk.proj.name}_bias_only_heart", np.ascontiguousarray(bias.astype(w.dtype)))
    for n in list(out.outputs):
        for i, t in enumerate(n.inputs):
            if t is out:
                n.inputs[i] = c
    if any(out is o for o in graph.outputs):
        raise UnsupportedGraph("the attention output is a graph output: cannot remove all heads of that layer")


def remove_heads(graph: Any, blocks: Sequence[AttentionBlock], heads: Mapping[int, Sequence[int]], *,
                 num_heads: int, head_dim: int, hidden: int, layout: Layout = "qkv_head") -> Any:
    """Remove ``heads`` (``{layer: [head, ...]}``) from ``graph`` in place and return it.

    ``blocks`` from ``_attn.find_attention`` (one per layer, in order); ``layout`` (default
    ``"qkv_head"``) is the column layout of a fused qkv projection (``"head_qkv"`` for GPT-NeoX).
    Does not clean up: call ``graph.cleanup().toposort()`` after (``prune`` does).
    """
    H, Dh = num_heads, head_dim
    for layer, gone in sorted(heads.items()):
        gone = sorted(set(int(h) for h in gone))
        if not gone:
            continue
        if not 0 <= layer < len(blocks):
            raise HeartError(f"plan removes heads of layer {layer}, the graph has {len(blocks)} attention blocks")
        if gone[0] < 0 or gone[-1] >= H:
            raise HeartError(f"plan removes heads {gone} of layer {layer}, the model has {H} heads: regenerate the plan")
        blk = blocks[layer]
        kept = [h for h in range(H) if h not in gone]
        for p in blk.projections:
            w, in_axis = weight_of(p)
            want = 3 * H * Dh if blk.fused else H * Dh
            if w.shape[1 - in_axis] != want:
                raise UnsupportedGraph(f"layer {layer}: projection {p.name} has {w.shape[1 - in_axis]} outputs, "
                                       f"expected {want} ({H} heads of {Dh}): does the plan match this model?")
        if not kept:
            _remove_branch(graph, blk, hidden)
            continue
        cols = head_columns(kept, H, Dh, blk.fused, layout)
        rows = head_columns(kept, H, Dh, False, layout)
        for p in blk.projections:
            _set_weight(p, cols, "out")
            _slice_bias(p, cols)
        _set_weight(blk.proj, rows, "in")
        fn = _head_fn(H, len(kept), Dh)
        for n in blk.region:
            if n.op in SHAPE_INPUT:
                rewrite_shape_input(graph, n, fn)
            if "num_heads" in n.attrs:
                n.attrs["num_heads"] = len(kept)
    return graph
