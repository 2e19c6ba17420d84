"""One analytic FLOPs model for every family, dense and with a Plan applied (stdlib + numpy only).

Counting convention (the same as :mod:`heart_onnx.graph_flops` for MatMul/Gemm/Conv): per sample
(batch 1), one multiply-accumulate (MAC) = 2 FLOPs, and only matrix products and convolutions are
counted (LayerNorm, softmax, GELU, residual adds, TopK are not). What is counted, per family:

- ``vit`` (timm and HF ViT/DeiT): patch embedding conv ``P*D*C*p*p`` (``P`` patches), per block on ``n``
  tokens with ``h`` kept heads (``a = h*Dh``): qkv ``n*D*3a``, ``Q@K^T`` and ``A@V`` ``2*h*n*n*Dh``, output
  projection ``n*a*D``, MLP ``2*n*D*M``; classifier ``D*classes`` per classifier head on the class token.
- ``bert``: the same block (q, k, v separate but the same MACs), embeddings are gathers (0 MACs),
  pooler ``D*D`` on [CLS] and classifier ``D*classes`` when the geometry has them.
- ``gpt_neox`` at sequence length ``T`` (set it: LMs have no fixed length): the same block and the LM
  head ``T*D*vocab`` (the rotary table, a product of constant position ids, is folded by exporters).
- ``cnn``: a list of :class:`ConvLayer` (conv or linear, with output size), summed.

A Plan changes the count exactly as surgery changes the graph:

- heads: block ``l`` keeps ``h_l`` heads; qkv, both attention matmuls and the output projection shrink.
- tokens: a stage after block ``l`` keeping ``K`` tokens makes every later block run on ``K`` tokens
  (``K+1`` with ``fuse_dropped``). Selection overhead (reported in ``overhead`` and included in
  ``pruned``): the linear scorer ``(n-P)*D`` MACs (the class-token-attention scorer is a mean of
  softmax rows: no MACs), and the fused token's score-weighted mean ``(n-K)*D`` MACs; TopK and the
  gathers have no MACs.
- channel merges: the producer loses ``p`` output channels and the consumer ``p`` input channels.
- unstructured and 2:4 merges keep the dense shapes (``pruned`` is unchanged): the products they
  zero are reported as ``sparse_saved`` (realised only by sparse kernels, e.g. 2:4 on Ampere/Orin).

Geometry keys read (with their defaults): ``layers``, ``heads``, ``head_dim``, ``hidden`` (default
``heads*head_dim``), ``seq_len`` (tokens entering block 0), ``prefix_tokens`` (vit 1, bert 1, gpt_neox 0),
``mlp_hidden`` (also ``intermediate_size``/``mlp_dim``; default ``4*hidden``), ``patch_size`` and
``in_chans`` (vit; default 3; without ``patch_size`` it is derived from ``img_size`` and otherwise the
patch embedding is not counted), ``num_classes`` (default 0), ``classifier_heads`` (vit: default 2 when
``distilled`` else 1), ``pooler`` (bert: default True), ``vocab_size``/``vocab`` and ``lm_head``
(gpt_neox, default 0 and True), and for ``cnn`` ``conv_layers``: a list of dicts with ConvLayer's fields.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import HeartError

TRANSFORMER_FAMILIES = ("vit", "bert", "gpt_neox")

_BLOCK_RE = re.compile(r"(?:^|\.)(?:blocks|block|layers|layer|h)\.(\d+)(?:\.|$)")


# ---------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class TransformerSpec:
    """What the FLOPs of a transformer depend on (all counts per sample)."""

    family: str
    layers: int
    heads: int
    head_dim: int
    hidden: int
    mlp_hidden: int
    seq_len: int  # tokens entering block 0
    prefix_tokens: int
    embed_macs: int = 0  # MACs before block 0 (patch embedding conv)
    head_macs: int = 0  # MACs after the last block (classifier, pooler, LM head)
    patches: int = 0  # vit: tokens produced by the patch embedding

    def block_macs(self, tokens: int, heads: int, mlp_cut: int = 0) -> int:
        """MACs of one block on ``tokens`` tokens with ``heads`` kept heads and ``mlp_cut`` MLP channels merged away."""
        a = heads * self.head_dim  # attention width after head removal
        d = self.hidden
        m = self.mlp_hidden - mlp_cut
        return tokens * (d * 3 * a + a * d + 2 * d * m) + 2 * heads * tokens * tokens * self.head_dim

    def head_block_macs(self, tokens: int) -> int:
        """MACs one head costs in a block on ``tokens`` tokens (qkv + out-proj + both attention matmuls)."""
        return tokens * 4 * self.hidden * self.head_dim + 2 * tokens * tokens * self.head_dim

    def selection_macs(self, tokens_in: int, keep: int, scorer: str, fuse_dropped: bool) -> int:
        """MACs of one token stage (scorer and fused token): ``tokens_in`` tokens, ``keep`` kept."""
        n_free = tokens_in - self.prefix_tokens
        macs = n_free * self.hidden if scorer == "linear" else 0
        if fuse_dropped:
            macs += (tokens_in - keep) * self.hidden
        return macs

    def rows_for_weight(self, name: str, tokens_per_layer: Sequence[int]) -> int:
        """How many rows (tokens) the linear weight ``name`` is applied to, for sparse/channel accounting."""
        layer = weight_layer(name)
        if layer is not None and 0 <= layer < self.layers:
            return int(tokens_per_layer[layer])
        low = name.lower()
        if "patch" in low:
            return self.patches
        if self.family == "gpt_neox":
            return self.seq_len
        return 1  # classifier / pooler on the class token


@dataclass(frozen=True)
class ConvLayer:
    """One conv or linear layer of a CNN: a linear layer is ``kernel=(1, 1)``, ``out_hw=(1, 1)``."""

    name: str  # adapter weight name (with or without the trailing ".weight")
    in_ch: int
    out_ch: int
    kernel: tuple[int, int] = (1, 1)
    groups: int = 1
    out_hw: tuple[int, int] = (1, 1)

    @property
    def positions(self) -> int:
        return int(self.out_hw[0]) * int(self.out_hw[1])

    def macs(self, in_cut: int = 0, out_cut: int = 0) -> int:
        kh, kw = self.kernel
        return (self.out_ch - out_cut) * ((self.in_ch - in_cut) // self.groups) * kh * kw * self.positions


# ---------------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class FlopsReport:
    """FLOPs (2 per MAC, batch 1) of a model, dense and with a plan applied.

    ``pruned`` is what the pruned dense graph executes (selection overhead included); ``sparse_saved`` is
    what unstructured/2:4 merges additionally zero (realised only by sparse kernels): ``effective`` =
    ``pruned - sparse_saved``.
    """

    family: str
    dense: float
    pruned: float
    sparse_saved: float = 0.0
    overhead: float = 0.0
    by_part: Mapping[str, float] = field(default_factory=dict)  # pruned FLOPs by part
    by_layer: tuple[float, ...] = ()  # pruned FLOPs per block (transformers) or per layer (cnn)
    tokens_per_layer: tuple[int, ...] = ()  # tokens entering each block
    heads_per_layer: tuple[int, ...] = ()  # kept heads per block

    @property
    def macs_dense(self) -> float:
        return self.dense / 2

    @property
    def macs_pruned(self) -> float:
        return self.pruned / 2

    @property
    def effective(self) -> float:
        return self.pruned - self.sparse_saved

    @property
    def reduction(self) -> float:
        """Fraction of dense FLOPs removed (structural pruning only)."""
        return 1.0 - self.pruned / self.dense if self.dense else 0.0

    @property
    def speedup(self) -> float:
        return self.dense / self.pruned if self.pruned else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family, "flops_dense": self.dense, "flops_pruned": self.pruned,
            "flops_sparse_saved": self.sparse_saved, "flops_effective": self.effective,
            "flops_overhead": self.overhead, "reduction": self.reduction, "by_part": dict(self.by_part),
            "by_layer": list(self.by_layer), "tokens_per_layer": list(self.tokens_per_layer),
            "heads_per_layer": list(self.heads_per_layer),
        }


# ---------------------------------------------------------------------------------------------- helpers
def weight_layer(name: str) -> int | None:
    """Block index in an adapter weight name (``blocks.3.mlp.fc1.weight`` -> 3), or None outside blocks."""
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def _get(g: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if g.get(k) is not None:
            return g[k]
    return default


def _int(g: Mapping[str, Any], key: str, *aliases: str, default: Any = None) -> int:
    v = _get(g, key, *aliases, default=default)
    if v is None:
        raise HeartError(f"geometry lacks '{key}': re-run 'heart-onnx analyze' (the adapter records it)")
    try:
        iv = int(v)
    except (TypeError, ValueError):
        raise HeartError(f"geometry '{key}' must be an integer, got {v!r}") from None
    if iv < 0:
        raise HeartError(f"geometry '{key}' must be >= 0, got {iv}")
    return iv


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def transformer_spec(geometry: Mapping[str, Any], family: str | None = None, seq_len: int | None = None) -> TransformerSpec:
    """Build a :class:`TransformerSpec` from an adapter geometry (see the module docstring for the keys).

    ``seq_len`` (default: ``geometry["seq_len"]``) must be given for language models.
    """
    family = family or geometry.get("family")
    if family not in TRANSFORMER_FAMILIES:
        raise HeartError(f"no transformer FLOPs model for family {family!r}: expected one of {', '.join(TRANSFORMER_FAMILIES)}")
    layers = _int(geometry, "layers")
    heads = _int(geometry, "heads", "num_heads")
    head_dim = _int(geometry, "head_dim")
    hidden = _int(geometry, "hidden", "hidden_size", default=heads * head_dim)
    mlp = _int(geometry, "mlp_hidden", "intermediate_size", "mlp_dim", default=4 * hidden)
    n = seq_len if seq_len is not None else geometry.get("seq_len")
    if n is None:
        raise HeartError(f"{family} has no fixed sequence length: pass seq_len (e.g. --seq-len 128)")
    n = int(n)
    if n <= 0:
        raise HeartError(f"sequence length must be > 0, got {n}")
    prefix = _int(geometry, "prefix_tokens", default=0 if family == "gpt_neox" else 1)
    classes = _int(geometry, "num_classes", default=0)
    embed = head = patches = 0
    if family == "vit":
        patches = n - prefix
        cin = _int(geometry, "in_chans", "in_channels", default=3)
        p = geometry.get("patch_size")
        if p is None and geometry.get("img_size") is not None and patches > 0:
            ih, iw = _pair(geometry["img_size"])
            side = math.isqrt(patches)
            p = (ih // side, iw // side) if side * side == patches else None
        if p is not None:
            ph, pw = _pair(p)
            embed = patches * hidden * cin * ph * pw
        n_cls = _int(geometry, "classifier_heads", default=2 if geometry.get("distilled") else 1)
        head = n_cls * hidden * classes
    elif family == "bert":
        head = (hidden * hidden if geometry.get("pooler", True) else 0) + hidden * classes
    else:  # gpt_neox
        vocab = _int(geometry, "vocab_size", "vocab", default=0)
        head = n * hidden * vocab if geometry.get("lm_head", True) else 0
    return TransformerSpec(family, layers, heads, head_dim, hidden, mlp, n, prefix, embed, head, patches)


def cnn_layers(geometry: Mapping[str, Any] | Iterable[Any]) -> list[ConvLayer]:
    """ConvLayers from ``geometry["conv_layers"]`` (dicts with ConvLayer's fields, as the CNN adapter
    records them) or an iterable of them."""
    if isinstance(geometry, Mapping):
        items = geometry.get("conv_layers")
        if items is None and isinstance(geometry.get("convs"), (list, tuple)):
            items = geometry["convs"]
    else:
        items = geometry
    if not items:
        raise HeartError("cnn geometry lacks 'conv_layers' (the conv/linear layer shapes): re-run 'heart-onnx analyze' "
                         "with this heart-onnx (the CNN adapter records them)")
    out = []
    for it in items:
        if isinstance(it, ConvLayer):
            out.append(it)
            continue
        try:
            out.append(ConvLayer(
                name=str(it["name"]), in_ch=int(it["in_ch"]), out_ch=int(it["out_ch"]),
                kernel=_pair(it.get("kernel", 1)), groups=int(it.get("groups", 1)), out_hw=_pair(it.get("out_hw", 1)),
            ))
        except (KeyError, TypeError, ValueError) as exc:
            raise HeartError(f"bad conv layer entry {it!r} ({exc}): expected name, in_ch, out_ch, kernel, groups, out_hw") from None
    return out


def tokens_per_layer(spec: TransformerSpec, stages: Sequence[tuple[int, int]], fuse_dropped: bool = False) -> list[int]:
    """Tokens entering each block, given ``stages`` = [(after_layer, keep), ...] (validated)."""
    n = [spec.seq_len] * spec.layers
    cur = spec.seq_len
    last = -1
    for layer, keep in sorted(stages):
        if layer <= last:
            raise HeartError(f"two token stages after layer {layer}: keep one stage per layer")
        if not 0 <= layer < spec.layers:
            raise HeartError(f"token stage after layer {layer} is outside the model's blocks 0..{spec.layers - 1}")
        if not spec.prefix_tokens < keep <= cur:
            raise HeartError(
                f"token stage after layer {layer} keeps {keep} tokens: it must keep between {spec.prefix_tokens + 1} "
                f"and the {cur} tokens entering it"
            )
        cur = keep + (1 if fuse_dropped else 0)
        for j in range(layer + 1, spec.layers):
            n[j] = cur
        last = layer
    return n


def _merge_rows_cnn(layers: Mapping[str, ConvLayer], name: str) -> ConvLayer:
    key = name[:-7] if name.endswith(".weight") else name
    if key not in layers:
        raise HeartError(f"weight {name} is not among the CNN's conv/linear layers: the plan was made for another model")
    return layers[key]


# ---------------------------------------------------------------------------------------------- the model
def model_flops(geometry: Mapping[str, Any], plan: Any = None, *, family: str | None = None,
                seq_len: int | None = None) -> FlopsReport:
    """FLOPs of the model described by ``geometry`` with ``plan`` (a :class:`heart_onnx.plan.Plan`) applied.

    ``family`` defaults to ``plan.family`` or ``geometry["family"]``; ``seq_len`` (default: the geometry's)
    is required for language models. ``plan=None`` gives the dense count (``pruned == dense``).
    """
    family = family or (plan.family if plan is not None else None) or geometry.get("family")
    if family == "cnn":
        return _cnn_flops(cnn_layers(geometry), plan)
    spec = transformer_spec(geometry, family, seq_len)
    return transformer_flops(spec, plan)


def transformer_flops(spec: TransformerSpec, plan: Any = None) -> FlopsReport:
    """FLOPs of a transformer ``spec`` with ``plan`` applied (see :func:`model_flops`)."""
    L = spec.layers
    heads = [spec.heads] * L
    stages: list[tuple[int, int]] = []
    scorer, fuse = "cls_attention", False
    merges: tuple = ()
    if plan is not None:
        for layer, hs in plan.heads.items():
            if not 0 <= int(layer) < L:
                raise HeartError(f"plan removes heads in layer {layer} but the model has blocks 0..{L - 1}")
            gone = set(int(h) for h in hs)
            if any(not 0 <= h < spec.heads for h in gone):
                raise HeartError(f"plan removes head(s) {sorted(gone)} in layer {layer}: heads are 0..{spec.heads - 1}")
            heads[int(layer)] = spec.heads - len(gone)
        stages = [(t.after_layer, t.keep) for t in plan.tokens]
        scorer, fuse = plan.token_scorer, bool(plan.fuse_dropped)
        merges = tuple(plan.merges)
    n = tokens_per_layer(spec, stages, fuse)
    channel_saved, sparse = _transformer_merges(spec, merges, n)

    dense = spec.embed_macs + L * spec.block_macs(spec.seq_len, spec.heads) + spec.head_macs
    by_layer = []
    attn = qkvo = mlp = 0
    for l in range(L):
        a = heads[l] * spec.head_dim
        qkvo += n[l] * 4 * spec.hidden * a
        attn += 2 * heads[l] * n[l] * n[l] * spec.head_dim
        mlp += 2 * n[l] * spec.hidden * spec.mlp_hidden - channel_saved[l]
        by_layer.append(spec.block_macs(n[l], heads[l]) - channel_saved[l])
    overhead = 0
    cur = spec.seq_len
    for layer, keep in sorted(stages):
        overhead += spec.selection_macs(cur, keep, scorer, fuse)
        cur = keep + (1 if fuse else 0)
    other = channel_saved[L]  # channel merges outside the blocks
    pruned = spec.embed_macs + sum(by_layer) + spec.head_macs + overhead - other
    by_part = {
        "embed": 2.0 * spec.embed_macs, "qkv_proj": 2.0 * qkvo, "attention": 2.0 * attn, "mlp": 2.0 * mlp,
        "head": 2.0 * (spec.head_macs - other), "select": 2.0 * overhead,
    }
    return FlopsReport(
        family=spec.family, dense=2.0 * dense, pruned=2.0 * pruned, sparse_saved=2.0 * sparse, overhead=2.0 * overhead,
        by_part=by_part, by_layer=tuple(2.0 * b for b in by_layer), tokens_per_layer=tuple(n), heads_per_layer=tuple(heads),
    )


def _transformer_merges(spec: TransformerSpec, merges: Sequence[Any], n: Sequence[int]) -> tuple[list[int], int]:
    """Per-block MACs removed by channel merges (index L: outside blocks) and MACs zeroed by sparse merges."""
    saved = [0] * (spec.layers + 1)
    sparse = 0
    for m in merges:
        rows = spec.rows_for_weight(m.weight, n)
        p = int(len(m.pruned))
        if m.granularity == "channel":
            per_row = p * channel_macs_per_row(m.shape, m.consumer_shape)
            layer = weight_layer(m.weight)
            idx = layer if layer is not None and 0 <= layer < spec.layers else spec.layers
            saved[idx] += rows * per_row
        else:
            sparse += rows * p
    return saved, sparse


def channel_macs_per_row(shape: Sequence[int], consumer_shape: Sequence[int] | None) -> int:
    """MACs per row (token) saved by removing one output channel of a linear producer and its consumer input."""
    prod_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    cons = 0
    if consumer_shape is not None and len(consumer_shape):
        cons = int(consumer_shape[0]) * (int(np.prod(consumer_shape[2:])) if len(consumer_shape) > 2 else 1)
    return prod_in + cons


def _cnn_flops(layers: list[ConvLayer], plan: Any = None) -> FlopsReport:
    by_name = {c.name[:-7] if c.name.endswith(".weight") else c.name: c for c in layers}
    out_cut = {k: 0 for k in by_name}
    in_cut = {k: 0 for k in by_name}
    sparse = 0
    for m in (plan.merges if plan is not None else ()):
        prod = _merge_rows_cnn(by_name, m.weight)
        p = int(len(m.pruned))
        if m.granularity == "channel":
            if m.consumer is None:
                raise HeartError(f"channel merge on {m.weight} names no consumer: regenerate the plan")
            cons = _merge_rows_cnn(by_name, m.consumer)
            pk = prod.name[:-7] if prod.name.endswith(".weight") else prod.name
            ck = cons.name[:-7] if cons.name.endswith(".weight") else cons.name
            out_cut[pk] += p
            in_cut[ck] += p
        else:
            sparse += p * prod.positions
    dense = sum(c.macs() for c in layers)
    by_layer = tuple(2.0 * c.macs(in_cut[k], out_cut[k]) for k, c in by_name.items())
    pruned = sum(by_layer) / 2
    for k, c in by_name.items():
        if c.groups != 1 and (in_cut[k] or out_cut[k]):
            raise HeartError(f"channel merge touches grouped/depthwise conv {k}: it is not a removable channel pair")
    return FlopsReport(family="cnn", dense=2.0 * dense, pruned=2.0 * pruned, sparse_saved=2.0 * sparse,
                       by_part={"conv_linear": 2.0 * pruned}, by_layer=by_layer)
