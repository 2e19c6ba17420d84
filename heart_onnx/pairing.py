"""CAMP-HiVe weight-pair merging in numpy: which weights to prune, their partners and coefficients.

Input: one entry of ``Sensitivities.pairs`` (a ``dict[str, np.ndarray]`` made by
``heart_onnx.sensitivity.pairs.weight_sensitivities``), keys:

- ``name`` (0-d str), ``sha`` (0-d str), ``shape`` (int64), ``weight`` (float32, PyTorch layout
  ``(out, in[, kh, kw])``), ``hdiag`` (Hutchinson estimate of the loss Hessian diagonal, same shape),
  ``curvature`` (0-d: top eigenvalue of the layer's Hessian block, power iteration),
- optional ``gram`` ``(R, R)``: second moment ``E[x x^T]`` of the layer input along the reduction
  axis (``R = in * kh * kw``, the order of ``weight.reshape(out, R)``; for Conv the unfolded patches),
- channel pairs (producer entries only): ``consumer`` (0-d str), ``consumer_sha``, ``consumer_shape``,
  ``consumer_weight``, ``consumer_hdiag``, ``consumer_curvature`` and optional ``consumer_gram``
  ``(C, C)``: ``E[a a^T]`` of the consumer's input channels (after BatchNorm/activation).

Significance (all Hessian methods): ``s_i = 1/2 h_i w_i^2`` (the second-order loss change of zeroing
``w_i`` alone, OBD), with ``h_i`` clipped to ``[0, curvature]``: every diagonal entry of a positive
semi-definite block lies between 0 and its top eigenvalue, so the power-iteration curvature bounds
the noisy Hutchinson estimate.

Pairs (cyclic, least significant into significant): inside each group (a row ``W[o, :]`` for
``unstructured``; a group of four consecutive weights along the input axis for ``2:4``; all
channels for ``channel``) the pruned weights sorted by ascending significance are assigned to the
kept weights sorted by descending significance, cyclically: pruned ``k`` -> kept ``k mod n_kept``.
Partners share the output row, so a merge never mixes outputs (and commutes with any per-output
scaling, e.g. a BatchNorm folded into a Conv by the exporter). ``camp`` by default picks, for each
pruned weight, the kept weight of its group whose input correlates most with its own (largest
``rho_pq^2``, which by the formula below minimises the remaining loss ``1 - rho^2``); ``pairing="cyclic"``
keeps the paper's order. On the demo CNN the correlated partner wins at every sparsity and granularity
(``benchmarks/pairs_cnn.py``), so it is the default.

Merge coefficient (``method="camp"``), derived. Moving ``w_p``'s contribution to its partner ``q``
changes the weights by ``d_p = -w_p``, ``d_q = c w_p``; the second-order loss change is
``dL(c) = 1/2 w_p^2 (H_pp - 2 c H_pq + c^2 H_qq)`` (gradient 0 at the dense point of the label-free
loss), minimised by ``c* = H_pq / H_qq`` with ``dL(c*) = 1/2 H_pp w_p^2 (1 - rho_pq^2)``. For a
linear or conv layer ``y = W x`` the Gauss-Newton block of one output row factorises as
``H_(o,i),(o,j) ~= G_oo E[x_i x_j]`` (K-FAC), so ``c* = E[x_p x_q] / E[x_q^2]``: the least-squares
coefficient of the pruned input on the partner's input. In channel mode the same argument on the
consumer's columns gives ``c* = E[a_p a_q] / E[a_q^2]`` over the consumer's input channels. Without
a Gram matrix the diagonal Hessian says ``c* = 0`` (merging cannot help), so ``camp`` falls back to
zeroing.

Predicted loss change of a merge set (second order): with ``D`` the change of the weight (or of the
consumer in channel mode) and ``G_o = sum_r h[o, r] / tr(Sigma)`` (the K-FAC output factor fitted to
the Hessian diagonal), ``dL = 1/2 sum_o G_o D_o Sigma D_o^T``; without a Gram matrix the diagonal
``dL = 1/2 sum h D^2``.

Methods, all through :func:`make_merge`: ``camp`` (significance, correlated or cyclic partners, ``c*``),
``half`` (the paper's rule: significance, cyclic partners, ``c = 1/2``), ``hessian`` (OBD: zero by
significance, no merge) and ``magnitude`` (zero the smallest ``|w|``; channels by producer L1 norm).
Pruning methods are merges with ``coef = 0`` (partner still a kept weight of the same row).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from .errors import HeartError
from .plan import Granularity, WeightMerge

Entry = Mapping[str, np.ndarray]
METHODS = ("camp", "half", "hessian", "magnitude")
GRANULARITIES = ("unstructured", "2:4", "channel")
PAIRINGS = ("cyclic", "best")


# ---------------------------------------------------------------------------------------------- entries
def pack(entries: Mapping[str, Entry]) -> dict[str, np.ndarray]:
    """``{name: {field: array}}`` -> the flat ``Sensitivities.pairs`` form ``{"name/field": array}``."""
    return {f"{name}/{k}": np.asarray(v) for name, e in entries.items() for k, v in e.items()}


def entries(pairs: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The flat ``Sensitivities.pairs`` (``"name/field"`` keys) -> ``{name: entry}`` (inverse of :func:`pack`)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, v in pairs.items():
        name, sep, fld = key.rpartition("/")
        if not sep:
            raise HeartError(f"pairs key {key!r} is not '<weight>/<field>': regenerate the sensitivities with 'heart-onnx analyze'")
        out.setdefault(name, {})[fld] = v
    return out


def _str(entry: Entry, key: str) -> str:
    return str(np.asarray(entry[key]).item())


def _shape(entry: Entry, prefix: str = "") -> tuple[int, ...]:
    if f"{prefix}shape" in entry:
        return tuple(int(s) for s in np.asarray(entry[f"{prefix}shape"]).reshape(-1))
    return tuple(np.asarray(entry[f"{prefix}weight"]).shape)


def clipped_hdiag(entry: Entry, prefix: str = "") -> np.ndarray:
    """Hessian diagonal clipped to ``[0, curvature]`` (float64), ``prefix="consumer_"`` for the consumer."""
    h = np.asarray(entry[f"{prefix}hdiag"], dtype=np.float64)
    lam = float(np.asarray(entry.get(f"{prefix}curvature", np.inf)))
    if not np.isfinite(lam) or lam <= 0:
        lam = np.inf
    return np.clip(np.nan_to_num(h, nan=0.0), 0.0, lam)


def kfac_hdiag(entry: Entry, prefix: str = "") -> np.ndarray:
    """Hessian diagonal denoised by the K-FAC structure: ``h[o, r] ~= G_o Sigma_rr`` (float64, weight shape).

    ``G_o = sum_r h[o, r] / tr(Sigma)`` pools the Hutchinson estimates of a whole output row (one per
    output channel and kernel tap in channel mode), so a few probes give a usable per-weight diagonal.
    Without a Gram matrix: the clipped raw estimate.
    """
    h = clipped_hdiag(entry, prefix)
    gram = entry.get(f"{prefix}gram")
    if gram is None:
        return h
    sig = np.clip(np.diag(np.asarray(gram, np.float64)), 0.0, None)
    if prefix:  # consumer: gram over input channels (axis 1), one factor per (output, tap)
        g = h.sum(axis=1, keepdims=True) / max(float(sig.sum()), 1e-30)
        return g * sig.reshape((1, -1) + (1,) * (h.ndim - 2))
    g = h.reshape(h.shape[0], -1).sum(axis=1) / max(float(sig.sum()), 1e-30)
    return (g[:, None] * sig[None, :]).reshape(h.shape)


def significance(entry: Entry, denoise: bool = True) -> np.ndarray:
    """Per-weight ``1/2 h w^2`` (float64, weight shape); ``denoise=True`` uses :func:`kfac_hdiag`."""
    w = np.asarray(entry["weight"], dtype=np.float64)
    h = kfac_hdiag(entry) if denoise else clipped_hdiag(entry)
    return 0.5 * h * w * w


def channel_significance(entry: Entry, denoise: bool = True) -> np.ndarray:
    """Per-channel loss change of removing the channel alone: ``1/2 sum h_C C^2`` over the consumer column (C,)."""
    c = np.asarray(entry["consumer_weight"], dtype=np.float64)
    h = kfac_hdiag(entry, "consumer_") if denoise else clipped_hdiag(entry, "consumer_")
    s = 0.5 * h * c * c
    return s.sum(axis=tuple(i for i in range(s.ndim) if i != 1))


def supports(entry: Entry, granularity: Granularity) -> bool:
    """Whether ``granularity`` applies to this weight (2:4 needs ``in % 4 == 0``; channel needs a consumer)."""
    shape = _shape(entry)
    if granularity == "unstructured":
        return len(shape) >= 2 and shape[0] >= 1
    if granularity == "2:4":
        return len(shape) >= 2 and shape[1] % 4 == 0
    if granularity == "channel":
        return "consumer_weight" in entry and shape[0] >= 2
    return False


# ---------------------------------------------------------------------------------------------- groups
def _groups(shape: tuple[int, ...], granularity: str) -> np.ndarray:
    """Flat weight indices arranged as (G, L) groups (rows for unstructured, fours for 2:4)."""
    n = int(np.prod(shape))
    out = shape[0]
    if granularity == "unstructured":
        return np.arange(n, dtype=np.int64).reshape(out, n // out)
    cin = shape[1]
    k = n // (out * cin)
    idx = np.arange(n, dtype=np.int64).reshape(out, cin, k).transpose(0, 2, 1)  # (out, K, in)
    return idx.reshape(-1, 4)


def _select(score_g: np.ndarray, granularity: str, sparsity: float) -> np.ndarray:
    """Boolean (G, L) mask of pruned positions: the lowest scores; at least one kept per group."""
    g, l = score_g.shape
    mask = np.zeros((g, l), dtype=bool)
    if granularity == "2:4":
        order = np.argsort(score_g, axis=1, kind="stable")[:, :2]
        np.put_along_axis(mask, order, True, axis=1)
        return mask
    n = int(round(float(sparsity) * g * l))
    n = min(n, g * (l - 1))
    if n <= 0:
        return mask
    s = score_g.astype(np.float64, copy=True)
    s[np.arange(g), np.argmax(s, axis=1)] = np.inf  # keep each row's most significant weight
    flat = np.argpartition(s.reshape(-1), n - 1)[:n]
    mask.reshape(-1)[flat] = True
    return mask


def _cyclic(idx_g: np.ndarray, mask_g: np.ndarray, score_g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pruned, partner) flat indices: in each group pruned ascending -> kept descending, cyclically."""
    key = np.where(mask_g, score_g, -score_g)
    order = np.lexsort((key, mask_g), axis=-1)  # kept first (descending score), then pruned (ascending)
    idx_s = np.take_along_axis(idx_g, order, axis=1)
    mask_s = np.take_along_axis(mask_g, order, axis=1)
    n_kept = mask_g.shape[1] - mask_g.sum(axis=1)
    gi, j = np.nonzero(mask_s)
    pos = (j - n_kept[gi]) % n_kept[gi]
    return idx_s[gi, j], idx_s[gi, pos]


_TOPK = 32  # candidate partners kept per reduction index for the "best" pairing (then a full search)


def _best(idx_g: np.ndarray, mask_g: np.ndarray, red: np.ndarray, corr2: np.ndarray,
          order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pruned, partner): each pruned weight goes to the kept weight of its group with the largest rho^2.

    ``order``: optional (L, K) candidate lists (most correlated first, from :func:`_candidates`).
    """
    g, l = idx_g.shape
    red_g = red[idx_g]  # (G, L) reduction index of each member
    gi, j = np.nonzero(mask_g)
    if l <= 8:  # small groups (2:4): compare all members
        c = corr2[red_g[:, :, None], red_g[:, None, :]]  # (G, L, L)
        c = np.where(mask_g[:, None, :], -np.inf, c)  # partners must be kept
        best = c.argmax(axis=2)
        return idx_g[gi, j], idx_g[gi, best[gi, j]]
    if not np.array_equal(red_g[0], np.arange(l)) or not np.all(red_g == red_g[0]):
        raise ValueError("row groups must list the reduction axis in order")
    order = _candidates(corr2) if order is None else order
    pos = np.full(len(gi), -1, np.int64)
    todo = np.arange(len(gi))
    for k in range(order.shape[1]):  # walk the candidate lists until a kept weight of the row turns up
        cand = order[j[todo], k]
        ok = ~mask_g[gi[todo], cand] & (cand != j[todo])
        pos[todo[ok]] = cand[ok]
        todo = todo[~ok]
        if len(todo) == 0:
            break
    for start in range(0, len(todo), 1024):  # rare: no kept weight among the candidates, search the row
        t = todo[start:start + 1024]
        c = np.where(mask_g[gi[t]], -np.inf, corr2[j[t]])  # (n, L)
        pos[t] = c.argmax(axis=1)
    return idx_g[gi, j], idx_g[gi, pos]


def _candidates(corr2: np.ndarray) -> np.ndarray:
    """(L, K+1) most correlated indices per row of ``corr2`` (descending; K = ``_TOPK``)."""
    l = corr2.shape[0]
    k = min(l, _TOPK + 1)
    part = np.argpartition(-corr2, k - 1, axis=1)[:, :k] if k < l else np.tile(np.arange(l), (l, 1))
    vals = np.take_along_axis(corr2, part, axis=1)
    return np.take_along_axis(part, np.argsort(-vals, axis=1, kind="stable"), axis=1)


_PREP: list[tuple[tuple, dict]] = []  # tiny LRU: per-weight work that does not depend on the sparsity


def _prepared(entry: Entry, prefix: str, key: str) -> dict:
    """Cached ``corr2`` and candidate lists of the Gram matrix ``entry[prefix + "gram"]``."""
    gram = entry.get(f"{prefix}gram")
    ident = (id(gram), key)
    for k, v in _PREP:
        if k == ident and v["gram"] is gram:
            return v
    v = {"gram": gram}
    if gram is not None:
        v["corr2"] = _corr2(np.asarray(gram, np.float64))
        v["order"] = _candidates(v["corr2"]) if v["corr2"].shape[0] > 8 else None
    _PREP.insert(0, (ident, v))
    del _PREP[2:]
    return v


def _corr2(gram: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.clip(np.diag(gram), 1e-30, None))
    r = gram / d[:, None] / d[None, :]
    return r * r


def _gram_coef(gram: np.ndarray | None, rp: np.ndarray, rq: np.ndarray) -> np.ndarray:
    if gram is None:
        return np.zeros(len(rp), np.float32)
    gram = np.asarray(gram, dtype=np.float64)
    den = gram[rq, rq]
    c = np.where(den > 0, gram[rp, rq] / np.where(den > 0, den, 1.0), 0.0)
    return c.astype(np.float32)


# ---------------------------------------------------------------------------------------------- merges
def make_merge(entry: Entry, granularity: Granularity, sparsity: float, method: str = "camp",
               pairing: str = "best", name: str | None = None) -> WeightMerge:
    """A :class:`~heart_onnx.plan.WeightMerge` for one weight.

    ``sparsity``: fraction of weights (unstructured; at most ``(R-1)/R``, one weight per row stays) or of
    output channels (channel; at least one stays) merged away; ``2:4`` always prunes two of every four
    along the input axis (``sparsity`` must be 0.5, or 0 for no merge). ``method``: ``"camp"`` (default),
    ``"half"``, ``"hessian"``, ``"magnitude"``. ``pairing``: ``"best"`` (default: the kept weight of the
    group whose input correlates most, ``camp`` only and only with a Gram matrix, else cyclic) or
    ``"cyclic"`` (the paper's order); ``half`` always pairs cyclically, as the paper does.
    ``name`` defaults to ``entry["name"]``.
    """
    if method not in METHODS:
        raise HeartError(f"unknown merge method {method!r}: use one of {', '.join(METHODS)}")
    if granularity not in GRANULARITIES:
        raise HeartError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    if pairing not in PAIRINGS:
        raise HeartError(f"unknown pairing {pairing!r}: use one of {', '.join(PAIRINGS)}")
    sparsity = float(sparsity)
    if not (0.0 <= sparsity < 1.0):
        raise HeartError(f"sparsity {sparsity} is out of range: use a fraction in [0, 1)")
    name = name if name is not None else _str(entry, "name")
    shape = _shape(entry)
    if not supports(entry, granularity):
        raise HeartError(f"{name} {shape} does not support {granularity} merging "
                         f"({'input channels not a multiple of 4' if granularity == '2:4' else 'no channel consumer'}): "
                         f"choose another granularity for this weight")
    if granularity == "2:4" and sparsity not in (0.0, 0.5):
        raise HeartError(f"2:4 sparsity is always 0.5 (got {sparsity}): pass 0.5, or 0 for no merge")
    if granularity == "channel":
        return _make_channel(entry, sparsity, method, pairing, name, shape)

    w = np.asarray(entry["weight"], dtype=np.float64).reshape(-1)
    sig = significance(entry).reshape(-1)
    score = np.abs(w) if method == "magnitude" else sig
    idx_g = _groups(shape, granularity)
    gram = entry.get("gram")
    red = np.arange(w.size, dtype=np.int64) % (w.size // shape[0])  # reduction index of each flat index
    empty = sparsity == 0.0
    mask_g = np.zeros(idx_g.shape, bool) if empty else _select(score[idx_g], granularity, sparsity)
    if pairing == "best" and gram is not None and method == "camp":
        prep = _prepared(entry, "", granularity)
        pruned, partner = _best(idx_g, mask_g, red, prep["corr2"], prep["order"] if granularity != "2:4" else None)
    else:
        pruned, partner = _cyclic(idx_g, mask_g, score[idx_g])
    coef = _coef(method, gram, red[pruned], red[partner])
    return WeightMerge(weight=name, weight_sha=_str(entry, "sha"), shape=shape, granularity=granularity,
                       pruned=pruned.astype(np.int64), partner=partner.astype(np.int64), coef=coef)


def _coef(method: str, gram: np.ndarray | None, rp: np.ndarray, rq: np.ndarray) -> np.ndarray:
    if method == "camp":
        return _gram_coef(gram, rp, rq)
    if method == "half":
        return np.full(len(rp), 0.5, np.float32)
    return np.zeros(len(rp), np.float32)


def _make_channel(entry: Entry, sparsity: float, method: str, pairing: str, name: str,
                  shape: tuple[int, ...]) -> WeightMerge:
    c = shape[0]
    if method == "magnitude":
        score = np.abs(np.asarray(entry["weight"], np.float64)).reshape(c, -1).sum(axis=1)
    else:
        score = channel_significance(entry)
    n = min(int(round(sparsity * c)), c - 1)
    mask = np.zeros((1, c), bool)
    if n > 0:
        mask[0, np.argsort(score, kind="stable")[:n]] = True
    idx = np.arange(c, dtype=np.int64)[None, :]
    gram = entry.get("consumer_gram")
    if pairing == "best" and gram is not None and method == "camp":
        prep = _prepared(entry, "consumer_", "channel")
        pruned, partner = _best(idx, mask, idx[0], prep["corr2"], prep["order"])
    else:
        pruned, partner = _cyclic(idx, mask, score[None, :])
    coef = _coef(method, gram, pruned, partner)
    return WeightMerge(weight=name, weight_sha=_str(entry, "sha"), shape=shape, granularity="channel",
                       pruned=pruned, partner=partner, coef=coef, consumer=_str(entry, "consumer"),
                       consumer_sha=_str(entry, "consumer_sha"), consumer_shape=_shape(entry, "consumer_"))


# ---------------------------------------------------------------------------------------------- the rule
def apply_rule(array: np.ndarray, merge: WeightMerge, role: str = "weight") -> np.ndarray:
    """The MERGE RULE of ``heart_onnx.plan`` on a numpy array in PyTorch layout; returns a float32 copy.

    ``role="weight"``: the merged weight (channel mode: producer rows ``pruned`` zeroed, as the masked
    reference does); ``role="consumer"`` (channel mode only): the consumer with merged input columns.
    """
    a = np.array(array, dtype=np.float32, copy=True, order="C")
    pruned = np.asarray(merge.pruned, np.int64)
    partner = np.asarray(merge.partner, np.int64)
    coef = np.asarray(merge.coef, np.float32)
    if merge.granularity != "channel":
        if role != "weight":
            raise ValueError(f"{merge.granularity} merges have no consumer")
        flat = a.reshape(-1)
        orig = flat[pruned].copy()
        np.add.at(flat, partner, coef * orig)
        flat[pruned] = 0.0
        return a
    if role == "weight":
        a[pruned] = 0.0
        return a
    moved = np.moveaxis(a, 1, 0)  # (C, out, ...) view of the consumer's input columns
    orig = moved[pruned].copy()
    np.add.at(moved, partner, coef.reshape((-1,) + (1,) * (moved.ndim - 1)) * orig)
    moved[pruned] = 0.0
    return a


# ---------------------------------------------------------------------------------------------- predictions
def predicted_loss(entry: Entry, merge: WeightMerge) -> float:
    """Second-order predicted loss change (nats of mean calibration loss) of one merge (module docstring)."""
    if len(merge.pruned) == 0:
        return 0.0
    if merge.granularity == "channel":
        c0 = np.asarray(entry["consumer_weight"], np.float32)
        d = apply_rule(c0, merge, "consumer").astype(np.float64) - c0
        h = clipped_hdiag(entry, "consumer_")
        # rows (out * K, C): one row per (output, kernel tap), columns the input channels
        d = np.moveaxis(d.reshape(d.shape[0], d.shape[1], -1), 1, 2).reshape(-1, d.shape[1])
        h = np.moveaxis(h.reshape(h.shape[0], h.shape[1], -1), 1, 2).reshape(-1, h.shape[1])
        gram = entry.get("consumer_gram")
    else:
        w0 = np.asarray(entry["weight"], np.float32)
        d = (apply_rule(w0, merge).astype(np.float64) - w0).reshape(w0.shape[0], -1)
        h = clipped_hdiag(entry).reshape(w0.shape[0], -1)
        gram = entry.get("gram")
    if gram is None:
        return float(0.5 * np.sum(h * d * d))
    gram = np.asarray(gram, np.float64)
    rows = np.nonzero(np.any(d != 0, axis=1))[0]
    d, h = d[rows], h[rows]
    g_o = h.sum(axis=1) / max(float(np.trace(gram)), 1e-30)  # K-FAC output factor per row
    quad = np.einsum("or,or->o", (d.astype(np.float32) @ gram.astype(np.float32)).astype(np.float64), d)
    return float(0.5 * np.sum(g_o * np.clip(quad, 0.0, None)))


def merge_curve(entry: Entry, granularity: Granularity, sparsities: Sequence[float] | Iterable[float],
                method: str = "camp", pairing: str = "best") -> np.ndarray:
    """Predicted loss change (float64 array) of :func:`make_merge` at each sparsity (2:4: 0 or 0.5 only)."""
    return np.array([predicted_loss(entry, make_merge(entry, granularity, s, method, pairing))
                     for s in sparsities], dtype=np.float64)


def row_signature(weight: np.ndarray) -> str:
    """SHA-256 of the weight's sign pattern, each output row's signs relative to its largest-magnitude entry.

    Unchanged by any non-zero per-row scaling, so it still names a Conv after the exporter folded a
    BatchNorm into it (where :func:`heart_onnx.models.fingerprint.weight_sha` no longer matches).
    Store it in ``Plan.anchors`` as ``"<weight name>:rowsign"`` for ``surgery.pairs.apply_merges``.
    """
    import hashlib

    w = np.asarray(weight, dtype=np.float32)
    rows = w.reshape(w.shape[0], -1)
    ref = np.sign(rows[np.arange(rows.shape[0]), np.argmax(np.abs(rows), axis=1)])[:, None]
    sig = (np.sign(rows) * ref).astype(np.int8)
    h = hashlib.sha256(repr(tuple(w.shape)).encode())
    h.update(np.ascontiguousarray(sig).tobytes())
    return h.hexdigest()


def anchors_for(merges: Sequence[WeightMerge], entries_by_name: Mapping[str, Entry]) -> dict[str, str]:
    """``Plan.anchors`` for merges: ``name -> sha`` and ``"name:rowsign" -> row_signature`` (weights and consumers)."""
    out: dict[str, str] = {}
    weights = {}
    for e in entries_by_name.values():
        weights[_str(e, "name")] = e["weight"]
        if "consumer_weight" in e:
            weights[_str(e, "consumer")] = e["consumer_weight"]
    for m in merges:
        for name, sha in ((m.weight, m.weight_sha), (m.consumer, m.consumer_sha)):
            if name is None:
                continue
            out[name] = sha
            if name in weights:
                out[f"{name}:rowsign"] = row_signature(weights[name])
    return out


def measured_sparsity(merge: WeightMerge) -> float:
    """Fraction of the weight (or of its output channels) that the merge removes."""
    total = int(np.prod(merge.shape)) if merge.granularity != "channel" else int(merge.shape[0])
    return float(len(merge.pruned)) / max(total, 1)
