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
from .carriers import SHAPE_INPUT, gs_mod, rewrite_shape_input
from .match import AttentionBlock

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


def _slice_linear(lin: Any, keep: np.ndarray, role: str) -> None:
    """New weight (and bias, for ``role="out"``) for ``lin`` keeping output columns or input rows ``keep``."""
    w = lin.torch_weight()  # (out, in)
    if role == "out":
        lin.set_weight(np.take(w, keep, axis=0))
        b = lin.bias
        if b is not None and b.size > 1:
            lin.set_bias(np.take(b.reshape(-1), keep))
    else:
        lin.set_weight(np.take(w, keep, axis=1))


def _remove_branch(graph: Any, blk: AttentionBlock, hidden: int) -> None:
    """All heads removed: the attention output becomes the output projection's bias (zeros without one)."""
    gs = gs_mod()
    out = blk.attn_out
    if any(out is o for o in graph.outputs):
        raise UnsupportedGraph("the attention output is a graph output: cannot remove all heads of that layer")
    w = blk.out_proj.weight
    bias = blk.out_proj.bias
    bias = np.zeros(hidden, dtype=w.dtype) if bias is None else bias.reshape(-1).astype(w.dtype)
    c = gs.Constant(f"{blk.proj.name}_bias_only_heart", np.ascontiguousarray(bias))
    for n in list(out.outputs):
        for i, t in enumerate(n.inputs):
            if t is out:
                n.inputs[i] = c


def remove_heads(graph: Any, blocks: Sequence[AttentionBlock], heads: Mapping[int, Sequence[int]], *,
                 num_heads: int, head_dim: int, hidden: int, layout: Layout = "qkv_head") -> Any:
    """Remove ``heads`` (``{layer: [head, ...]}``) from ``graph`` in place and return it.

    ``blocks`` from ``match.find_attention_blocks`` (one per layer, in order); ``layout`` (default
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
            want = 3 * H * Dh if blk.fused else H * Dh
            if p.out_features != want:
                raise UnsupportedGraph(f"layer {layer}: projection {p.node.name} has {p.out_features} outputs, "
                                       f"expected {want} ({H} heads of {Dh}): does the plan match this model?")
        if not kept:
            _remove_branch(graph, blk, hidden)
            continue
        cols = head_columns(kept, H, Dh, blk.fused, layout)
        rows = head_columns(kept, H, Dh, False, layout)
        for p in blk.projections:
            _slice_linear(p, cols, "out")
        _slice_linear(blk.out_proj, rows, "in")
        fn = _head_fn(H, len(kept), Dh)
        for n in blk.region:
            if n.op in SHAPE_INPUT:
                rewrite_shape_input(graph, n, fn)
            if "num_heads" in n.attrs:
                n.attrs["num_heads"] = len(kept)
    return graph
