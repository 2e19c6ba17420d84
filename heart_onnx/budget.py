"""Loss budget -> Plan: the Pareto curve of predicted loss change vs FLOPs, and the plan for one budget.

Numpy + stdlib only. The planner reads a :class:`heart_onnx.sensitivities.Sensitivities` and maximises
FLOPs saved (the analytic model of :mod:`heart_onnx.flops`) subject to the predicted loss change
(nats of mean calibration loss) being at most the budget.

Actions (one step each, all in one greedy):

- ``heads``: remove the next head of a layer, in ascending order of its sensitivity ``sens.head[l, h]``.
  Predicted loss: the sum of the removed heads' scores.
- ``tokens``: one stage per pruning layer ``l_1 < l_2 < ...`` (``token_layers``; default every 3rd layer,
  EViT/HEART-ViT style: 3, 6, 9 for 12 blocks; every layer from 1 for models under 8 blocks). A step drops
  ``token_step`` more tokens at stage ``s``, so the keep counts ``K_s`` stay monotone non-increasing
  (a progressive keep ratio) and every later stage keeps fewer too. Predicted loss (nested stages):
  ``sum_s C_s(K_s) - C_s(K_{s-1})`` with ``C_s`` = ``sens.token_keep_curve[l_s]`` (made monotone) and
  ``K_0 = N``: stage ``s`` is charged only for the tokens it drops beyond those already gone.
  Once the last stage keeps ``min_keep``, a step of stage ``i`` *moves* drops from the next later stage ``j``
  that drops any (``drops[i] += step, drops[j] -= step``): the keep of ``j`` and after is unchanged, blocks
  ``l_i+1 .. l_j`` run on fewer tokens. Without it tokens-only curves dead-end at the first ``min_keep``.
- ``pairs``: raise one weight's merge sparsity to the next grid step (``sparsities``; default
  0.1 ... 0.9 for ``unstructured`` and ``channel``, 0.5 for ``2:4``). Predicted loss:
  ``heart_onnx.pairing.merge_curve`` per weight, summed over weights.

Objective: *effective* FLOPs = structurally pruned FLOPs (heads, tokens, channel merges, selection
overhead included) minus the products that unstructured/2:4 merges zero (only sparse kernels realise
those; the plan reports both, see :class:`heart_onnx.flops.FlopsReport`).

Greedy: a heap keyed by FLOPs saved per predicted nat, lazily re-evaluated (removing heads makes token
steps save less and vice versa: an entry is re-scored when popped and re-pushed if it lost its place).
The sequence of steps is the Pareto curve; a budget picks, among the curve's points within the budget,
the one with the fewest FLOPs, so more budget never saves fewer FLOPs. ``refine=True`` then fills the
remaining budget with the best-ratio steps that still fit (may save a little more; it is not part of the
curve, so monotonicity in the budget is guaranteed only without it).

Calibration (two stages, both in ``sens.meta["calibration"]``; see :mod:`heart_onnx.calibration`):

1. per target: the additive prediction ``x`` becomes ``c * x**g`` (``c``, ``g`` default 1.0), fitted by
   :func:`calibrate` from measured single-target plans. This sets the exchange rate between targets
   that the greedy uses to choose its path.
2. per target *set*: heads and tokens interact, so the sum of stage-1 predictions of a mixed plan still
   drifts from what it measures. ``calibration["curves"][key]`` (key: the set's targets joined by ``,``
   in ``TARGETS`` order, e.g. ``"heads,tokens"``) is a :class:`heart_onnx.loss_map.LossMap` fitted on
   plans measured along that set's own Pareto curve (:func:`calibrate_curve`); it maps the curve's
   stage-1 total to measured nats. It is monotone, so it never changes which plan a budget picks
   among the curve's points, only what the curve (and the plan's ``predicted_loss_change``) says.
   :func:`pareto`, :func:`plan` and :func:`predict` apply it when the key of their targets has a curve.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import HeartError
from .loss_map import LossMap
from .flops import ConvLayer, FlopsReport, channel_macs_per_row, cnn_layers, model_flops, transformer_spec, weight_layer
from .plan import Plan, TokenStage

TARGETS = ("heads", "tokens", "pairs")
SCORERS = ("cls_attention", "linear")
GRANULARITIES = ("unstructured", "2:4", "channel")
MAX_BUDGET = 20.0  # nats of mean loss increase: beyond this a budget is a unit mistake, not a plan
_TINY = 1e-12


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Action:
    """One greedy step. ``index``: heads: the head removed; tokens: the stage (0-based, in ``token_layers``);
    pairs: the new sparsity grid step (1-based). ``dloss`` (calibrated nats) and ``dflops`` (effective FLOPs
    saved) are the step's marginal values when it was taken."""

    kind: str
    layer: int  # heads: block; tokens: the stage's after_layer; pairs: block of the weight (-1 outside blocks)
    index: int
    dloss: float
    dflops: float
    name: str = ""  # pairs: weight name
    # steps taken just before this one whose curve points were dropped (a later step lowered the predicted loss
    # below theirs, see _Problem.greedy); replaying the action replays them first. Empty for most actions.
    before: tuple["Action", ...] = ()


@dataclass(frozen=True, eq=False)
class Pareto:
    """The greedy curve: point ``i`` is the plan made of ``actions[:i]`` (point 0 = dense).

    ``loss`` (n+1,) predicted loss change (calibrated nats), ``flops`` (n+1,) effective FLOPs,
    ``flops_dense`` the dense FLOPs. Use :meth:`index_for` / :meth:`to_plan` to pick a budget's point.
    """

    loss: np.ndarray
    flops: np.ndarray
    flops_dense: float
    actions: tuple[Action, ...]
    targets: tuple[str, ...]
    token_layers: tuple[int, ...]
    granularity: str
    scorer: str
    fuse_dropped: bool
    _problem: Any = field(repr=False, default=None)
    raw_loss: np.ndarray | None = None  # the stage-1 prediction before the target set's loss map (None: no map)

    def __len__(self) -> int:
        return len(self.actions) + 1

    @property
    def saved(self) -> np.ndarray:
        """Fraction of dense FLOPs saved at each point."""
        return 1.0 - self.flops / self.flops_dense

    def front(self) -> np.ndarray:
        """Boolean mask of the non-dominated points (no other point has both less loss and fewer FLOPs)."""
        order = np.lexsort((self.flops, self.loss))
        mask = np.zeros(len(self.loss), bool)
        best = np.inf
        for i in order:
            if self.flops[i] < best:
                mask[i] = True
                best = self.flops[i]
        return mask

    def index_for(self, budget: float) -> int:
        """The point with the fewest FLOPs among those whose predicted loss is <= ``budget``."""
        b = check_budget(budget)
        ok = np.nonzero(self.loss <= b + 1e-12 * max(1.0, b))[0]
        return int(ok[np.argmin(self.flops[ok])]) if len(ok) else 0

    def to_plan(self, budget: float, *, refine: bool = False) -> Plan:
        """The plan for ``budget`` nats (see :func:`plan`)."""
        return self._problem.make_plan(self, check_budget(budget), refine)

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss.tolist(), "flops": self.flops.tolist(), "flops_dense": self.flops_dense,
            "targets": list(self.targets), "token_layers": list(self.token_layers), "granularity": self.granularity,
            "scorer": self.scorer, "fuse_dropped": self.fuse_dropped,
            "actions": [[a.kind, a.layer, a.index, a.name, a.dloss, a.dflops]
                        + ([[[b.kind, b.layer, b.index, b.name] for b in a.before]] if a.before else [])
                        for a in self.actions],
        }


# ---------------------------------------------------------------------------------------------- checks
def check_budget(budget: Any) -> float:
    """The budget as a float, or HeartError naming the valid range [0, MAX_BUDGET] nats."""
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise HeartError(f"budget must be a number of nats in [0, {MAX_BUDGET:g}] (e.g. 0.05), got {budget!r}") from None
    if not math.isfinite(b) or b < 0 or b > MAX_BUDGET:
        raise HeartError(
            f"budget {budget!r} is out of range: give the allowed increase of mean calibration loss in nats, "
            f"in [0, {MAX_BUDGET:g}] (e.g. 0.05)"
        )
    return b


def default_token_layers(layers: int) -> tuple[int, ...]:
    """Pruning layers: every 3rd block (3, 6, 9 of 12) from 8 blocks up; every block from 1 below that
    (from 0 for 2-3 blocks). The last block never prunes (nothing runs after it)."""
    if layers >= 8:
        return tuple(range(3, layers - 1, 3))
    start = 1 if layers >= 4 else 0
    return tuple(range(start, layers - 1))


def calibration_factors(sens: Any) -> dict[str, float]:
    """The per-target multiplicative factors in ``sens.meta["calibration"]`` (1.0 where absent)."""
    cal = (getattr(sens, "meta", None) or {}).get("calibration") or {}
    return {t: float(cal.get(t, 1.0)) for t in TARGETS}


def calibration_exponents(sens: Any) -> dict[str, float]:
    """The per-target exponents ``g`` of a ``"power"`` calibration (1.0: purely multiplicative)."""
    cal = (getattr(sens, "meta", None) or {}).get("calibration") or {}
    ex = cal.get("exponents") or {}
    return {t: float(ex.get(t, 1.0)) for t in TARGETS}


def target_key(targets: Iterable[str]) -> str:
    """Canonical key of a target set: its targets in ``TARGETS`` order joined by ``,`` (``"heads,tokens"``)."""
    ts = set(targets)
    return ",".join(t for t in TARGETS if t in ts)


def calibration_map(sens: Any, targets: Iterable[str]) -> LossMap | None:
    """The stage-2 loss map stored for this target set in ``sens.meta["calibration"]["curves"]`` (None if absent)."""
    cal = (getattr(sens, "meta", None) or {}).get("calibration") or {}
    d = (cal.get("curves") or {}).get(target_key(targets))
    return LossMap.from_dict(d) if d else None


def _transform(x: float, c: float, g: float) -> float:
    """Calibrated prediction ``c * x**g`` of an additive (raw) prediction ``x >= 0``."""
    if x <= 0.0:
        return 0.0
    return c * x if g == 1.0 else c * x ** g


def pairs_entries(sens: Any) -> dict[str, dict[str, np.ndarray]]:
    """``sens.pairs`` as ``{weight name: entry}``: accepts nested dicts or flat ``"<name>/<key>"`` arrays."""
    raw = getattr(sens, "pairs", None) or {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for k, v in raw.items():
        if isinstance(v, Mapping):
            out[str(k)] = dict(v)
        elif "/" in k:
            name, key = k.rsplit("/", 1)
            out.setdefault(name, {})[key] = v
    return out


def _geometry(sens: Any) -> tuple[str, dict[str, Any]]:
    meta = getattr(sens, "meta", None) or {}
    geo = dict(meta.get("geometry") or {})
    family = meta.get("family") or geo.get("family")
    if not family:
        raise HeartError("sensitivities record no model family: re-run 'heart-onnx analyze'")
    if not geo:
        raise HeartError("sensitivities record no geometry: re-run 'heart-onnx analyze'")
    return family, geo


def _default_seq_len(sens: Any, scorer: str) -> int | None:
    """Sequence length for models without a fixed one (BERT, GPT-NeoX): the token curve's, else meta's."""
    curve = _Problem._token_curve(sens, scorer)
    if curve is not None and curve.ndim == 2:
        return int(curve.shape[1] - 1)
    v = (getattr(sens, "meta", None) or {}).get("seq_len")
    return int(v) if v else None


def _monotone_curve(row: np.ndarray) -> np.ndarray:
    """Loss vs kept count made non-increasing in K (fmax from the right, nan ignored), 0 at K = N, >= 0."""
    r = np.asarray(row, dtype=np.float64)
    r = np.where(np.isfinite(r), r, np.nan)
    m = np.fmax.accumulate(r[::-1])[::-1]
    m = np.nan_to_num(m, nan=0.0)
    return np.clip(m - m[-1], 0.0, None)


# ---------------------------------------------------------------------------------------------- the problem
class _Problem:
    """Everything the greedy needs, precomputed; ``state`` arrays mutate during a run."""

    def __init__(self, sens: Any, targets: Sequence[str] | None, token_layers: Sequence[int] | None,
                 granularity: str, scorer: str, fuse_dropped: bool, seq_len: int | None, min_keep: int | None,
                 min_heads: int, token_step: int, sparsities: Sequence[float] | None, method: str):
        self.sens = sens
        self.family, self.geometry = _geometry(sens)
        if scorer not in SCORERS:
            raise HeartError(f"unknown token scorer {scorer!r}: use one of {', '.join(SCORERS)}")
        if granularity not in GRANULARITIES:
            raise HeartError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
        self.scorer, self.fuse, self.granularity, self.method = scorer, bool(fuse_dropped), granularity, method
        self.cal = calibration_factors(sens)
        self.gam = calibration_exponents(sens)
        self.is_cnn = self.family == "cnn"
        if seq_len is None and not self.is_cnn and self.geometry.get("seq_len") is None:
            seq_len = _default_seq_len(sens, scorer)
        self.seq_len_arg = seq_len
        if self.is_cnn:
            self.convs = {(c.name[:-7] if c.name.endswith(".weight") else c.name): c for c in cnn_layers(self.geometry)}
            self.spec = None
            self.L = 0
        else:
            self.spec = transformer_spec(self.geometry, self.family, seq_len)
            self.L = self.spec.layers
        self.targets = self._targets(targets)
        self.lmap = calibration_map(sens, self.targets)

        # ---- heads
        self.head_order: list[np.ndarray] = []
        self.head_cost: list[np.ndarray] = []
        self.max_removed = [0] * self.L
        if "heads" in self.targets:
            h = np.asarray(sens.head, dtype=np.float64)
            if h.shape != (self.L, self.spec.heads):
                raise HeartError(f"head scores have shape {h.shape} but the model has {self.L} layers x {self.spec.heads} heads: re-run 'heart-onnx analyze'")
            h = np.clip(np.nan_to_num(h, nan=np.inf), 0.0, None)
            if not 0 <= min_heads <= self.spec.heads:
                raise HeartError(f"min_heads must be in [0, {self.spec.heads}], got {min_heads}")
            for l in range(self.L):
                order = np.argsort(h[l], kind="stable")
                self.head_order.append(order)
                self.head_cost.append(h[l][order])
                self.max_removed[l] = min(self.spec.heads - min_heads, int(np.isfinite(h[l]).sum()))  # nan: never removed
        self._hcum = [[0.0] + np.cumsum(c).tolist() for c in self.head_cost]
        self.head_cost = [c.tolist() for c in self.head_cost]

        # ---- tokens
        self.token_layers: tuple[int, ...] = ()
        self.curves: list[np.ndarray] = []
        self.N = self.spec.seq_len if self.spec is not None else 0
        self.P = self.spec.prefix_tokens if self.spec is not None else 0
        if "tokens" in self.targets:
            curve = self._token_curve(sens, scorer)
            if curve.shape != (self.L, self.N + 1):
                raise HeartError(f"token curve has shape {curve.shape} but the model has {self.L} layers and {self.N} tokens (expected {(self.L, self.N + 1)}): re-run 'heart-onnx analyze'")
            tl = default_token_layers(self.L) if token_layers is None else tuple(sorted(set(int(t) for t in token_layers)))
            bad = [t for t in tl if not 0 <= t < self.L - 1]
            if bad:
                raise HeartError(f"token layers {bad} are out of range: choose blocks in 0..{self.L - 2} (the last block cannot prune)")
            if not tl:
                raise HeartError("no token pruning layers: pass token_layers (e.g. --token-layers 1,2) or drop the tokens target")
            self.token_layers = tl
            self.curves = [_monotone_curve(curve[l]).tolist() for l in tl]  # lists: fast scalar indexing
            self.min_keep = self.P + 1 if min_keep is None else int(min_keep)
            if not self.P < self.min_keep <= self.N:
                raise HeartError(f"min_keep must be in [{self.P + 1}, {self.N}] (prefix tokens + 1 .. all tokens), got {min_keep}")
            if token_step < 1:
                raise HeartError(f"token_step must be >= 1, got {token_step}")
            self.token_step = int(token_step)
            if scorer == "linear":
                missing = [l for l in tl if int(l) not in {int(k) for k in (getattr(sens, "scorers", None) or {})}]
                if missing:
                    raise HeartError(f"the linear scorer was not fitted for layers {missing}: run 'heart-onnx analyze' with token scorers, or use --scorer cls_attention")
            elif self.max_removed:
                # the class-token-attention scorer reads the layer's kept heads: keep at least one there
                for l in tl:
                    self.max_removed[l] = min(self.max_removed[l], self.spec.heads - 1)

        # ---- pairs
        self.pair_names: list[str] = []
        self.pair_grid: np.ndarray = np.zeros(0)
        self.pair_sparsity: list[np.ndarray] = []  # per weight: 0 then the grid steps that prune more
        self.pair_loss: list[np.ndarray] = []
        self.pair_unit: list[np.ndarray] = []  # MACs saved per row at each grid step (cnn: absolute MACs)
        self.pair_layer: list[int] = []
        self.entries: dict[str, dict[str, np.ndarray]] = {}
        if "pairs" in self.targets:
            self._setup_pairs(sparsities)
        self.reset()

    # ---------------------------------------------------------------- setup helpers
    def _targets(self, targets: Sequence[str] | None) -> tuple[str, ...]:
        sens = self.sens
        have = {
            "heads": getattr(sens, "head", None) is not None and not self.is_cnn,
            "tokens": self._token_curve(sens, self.scorer, check=False) is not None and not self.is_cnn
            and self.family != "gpt_neox",
            "pairs": bool(pairs_entries(sens)),
        }
        if targets is None:
            out = tuple(t for t in TARGETS if have[t])
            if not out:
                raise HeartError("these sensitivities have nothing to plan (no head, token or weight scores): run 'heart-onnx analyze'")
            return out
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        out = []
        for t in targets:
            if t not in TARGETS:
                raise HeartError(f"unknown target {t!r}: use some of {', '.join(TARGETS)}")
            if not have[t]:
                why = {"heads": "head scores", "tokens": "token scores for this scorer", "pairs": "weight-pair scores"}[t]
                if t == "tokens" and self.family == "gpt_neox":
                    raise HeartError("token pruning does not apply to language models (every position needs logits): drop the tokens target")
                raise HeartError(f"target {t!r} needs {why}, which these sensitivities lack: re-run 'heart-onnx analyze' with it")
            if t not in out:
                out.append(t)
        if not out:
            raise HeartError(f"no targets given: use some of {', '.join(TARGETS)}")
        return tuple(out)

    @staticmethod
    def _token_curve(sens: Any, scorer: str, check: bool = True) -> np.ndarray | None:
        curves = getattr(sens, "token_keep_curves", None) or {}
        if scorer in curves:
            return np.asarray(curves[scorer], dtype=np.float64)
        base = getattr(sens, "token_keep_curve", None)
        if base is None:
            return None
        return np.asarray(base, dtype=np.float64)

    def _setup_pairs(self, sparsities: Sequence[float] | None) -> None:
        try:
            from . import pairing
        except ImportError as exc:  # pragma: no cover - pairing ships with heart-onnx
            raise HeartError(f"weight-pair planning needs heart_onnx.pairing ({exc})") from None
        self.pairing = pairing
        if self.granularity == "2:4":
            grid = [0.5]
        else:
            grid = sorted(set(float(s) for s in (sparsities if sparsities is not None else np.arange(1, 10) / 10)))
            if not grid or grid[0] <= 0 or grid[-1] >= 1:
                raise HeartError(f"sparsities must be fractions in (0, 1), got {list(sparsities or [])}")
        self.pair_grid = np.array([0.0] + list(grid))
        self.entries = pairs_entries(self.sens)
        for name in sorted(self.entries):
            e = self.entries[name]
            if not pairing.supports(e, self.granularity):
                continue
            shape = tuple(int(s) for s in np.asarray(e["shape"]).reshape(-1)) if "shape" in e else tuple(np.asarray(e["weight"]).shape)
            counts_all = [self._pruned_count(shape, s) for s in self.pair_grid]
            steps = [0] + [j for j in range(1, len(counts_all)) if counts_all[j] > max(counts_all[:j])]  # distinct counts
            if len(steps) < 2:
                continue
            sp = self.pair_grid[steps]
            counts = np.array([counts_all[j] for j in steps], dtype=np.float64)
            curve = np.concatenate([[0.0], pairing.merge_curve(e, self.granularity, list(sp[1:]), self.method)])
            curve = np.maximum.accumulate(np.clip(np.nan_to_num(curve, nan=np.inf), 0.0, None))
            if self.granularity == "channel":
                cshape = tuple(int(s) for s in np.asarray(e["consumer_shape"]).reshape(-1)) if "consumer_shape" in e else tuple(np.asarray(e["consumer_weight"]).shape)
                cons = str(np.asarray(e["consumer"]).item()) if "consumer" in e else None
                if self.is_cnn:
                    unit = counts * self._cnn_channel_unit(name, cons)
                else:
                    unit = counts * channel_macs_per_row(shape, cshape)
            else:
                unit = counts * (self._conv(name).positions if self.is_cnn else 1)
            self.pair_names.append(name)
            self.pair_sparsity.append(sp)
            self.pair_loss.append(curve)
            self.pair_unit.append(unit)
            layer = weight_layer(name)
            self.pair_layer.append(layer if layer is not None and 0 <= layer < self.L else -1)
        if not self.pair_names:
            raise HeartError(f"no weight supports {self.granularity} merging: choose another granularity (--granularity)")

    def _pruned_count(self, shape: tuple[int, ...], s: float) -> int:
        if self.granularity == "channel":
            return min(int(round(s * shape[0])), shape[0] - 1)
        n = int(np.prod(shape))
        if self.granularity == "2:4":
            return n // 2 if s > 0 else 0
        r = n // shape[0]
        return min(int(round(s * n)), shape[0] * (r - 1))

    def _conv(self, name: str) -> ConvLayer:
        key = name[:-7] if name.endswith(".weight") else name
        if key not in self.convs:
            raise HeartError(f"weight {name} is not in the CNN geometry's conv list: re-run 'heart-onnx analyze'")
        return self.convs[key]

    def _cnn_channel_unit(self, producer: str, consumer: str | None) -> float:
        p = self._conv(producer)
        c = self._conv(consumer) if consumer else None
        kh, kw = p.kernel
        unit = (p.in_ch // p.groups) * kh * kw * p.positions
        if c is not None:
            ckh, ckw = c.kernel
            unit += c.out_ch * ckh * ckw * c.positions
        return float(unit)

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        self.removed = [0] * self.L
        self.drops = [0] * len(self.token_layers)
        self.pstep = [0] * len(self.pair_names)
        self.unit_in = [0.0] * (self.L + 1)  # pair MACs saved per row, per block (index L: outside blocks)
        self._dirty()

    def _dirty(self, blocks: bool = True) -> None:
        self._n: list[int] | None = None
        self._macs: float | None = None
        if blocks:
            self._ab: tuple[list[float], list[float]] | None = None

    def keeps(self, drops: Sequence[int] | None = None) -> list[int]:
        """Tokens kept by each stage (prefix included), whether or not the stage drops any."""
        out, k = [], self.N
        for d in (self.drops if drops is None else drops):
            k -= d
            out.append(k)
        return out

    def tokens_per_layer(self, drops: Sequence[int] | None = None) -> list[int]:
        """Tokens entering each block."""
        if drops is None and self._n is not None:
            return self._n
        d = self.drops if drops is None else drops
        n = [self.N] * self.L
        cur = self.N
        keeps = self.keeps(d)
        for s, l in enumerate(self.token_layers):
            if d[s] > 0:
                cur = keeps[s] + (1 if self.fuse else 0)
                for j in range(l + 1, self.L):
                    n[j] = cur
        if drops is None:
            self._n = n
        return n

    def _f(self, target: str, raw: float) -> float:
        return _transform(raw, self.cal[target], self.gam[target])

    def token_loss(self, drops: Sequence[int] | None = None) -> float:
        """Calibrated token loss (nested stages, module docstring)."""
        d = self.drops if drops is None else drops
        total, prev = 0.0, self.N
        for s, k in enumerate(self.keeps(d)):
            c = self.curves[s]
            total += c[k] - c[prev]
            prev = k
        return self._f("tokens", float(total))

    def heads_raw(self) -> float:
        return float(sum(self._hcum[l][self.removed[l]] for l in range(self.L)))

    def pairs_raw(self) -> float:
        return float(sum(self.pair_loss[i][s] for i, s in enumerate(self.pstep) if s))

    def heads_loss(self) -> float:
        return self._f("heads", self.heads_raw())

    def pairs_loss(self) -> float:
        return self._f("pairs", self.pairs_raw())

    def loss_by_target(self) -> dict[str, float]:
        out = {}
        if "heads" in self.targets:
            out["heads"] = self.heads_loss()
        if "tokens" in self.targets:
            out["tokens"] = self.token_loss()
        if "pairs" in self.targets:
            out["pairs"] = self.pairs_loss()
        return out

    def _prefix(self) -> tuple[list[float], list[float]]:
        """Prefix sums over blocks of the per-token (alpha) and per-token-squared (beta) MACs of each block."""
        if self._ab is None:
            sp = self.spec
            per_head = 4 * sp.hidden * sp.head_dim  # qkv + out-proj MACs per token per head
            mlp = 2 * sp.hidden * sp.mlp_hidden
            A, B = [0.0], [0.0]
            a = b = 0.0
            for l in range(self.L):
                h = sp.heads - self.removed[l]
                a += h * per_head + mlp - self.unit_in[l]  # MACs linear in tokens
                b += 2 * h * sp.head_dim  # attention matmuls: quadratic in tokens
                A.append(a)
                B.append(b)
            self._ab = (A, B)
        return self._ab

    def effective_macs(self, drops: Sequence[int] | None = None) -> float:
        """Effective MACs (structural pruning, selection overhead, minus sparse zeros) of the current state
        (with ``drops`` instead of the current token drops if given)."""
        if drops is None and self._macs is not None:
            return self._macs
        if self.is_cnn:
            total = float(sum(c.macs() for c in self.convs.values()) - sum(self.pair_unit[i][s] for i, s in enumerate(self.pstep) if s))
        else:
            sp = self.spec
            d = self.drops if drops is None else drops
            A, B = self._prefix()
            total = sp.embed_macs + sp.head_macs - self.unit_in[self.L]
            start, cur = 0, self.N  # blocks [start, ...) run on cur tokens
            k = self.N
            for s, l in enumerate(self.token_layers):
                k -= d[s]
                if d[s] > 0:
                    total += cur * (A[l + 1] - A[start]) + cur * cur * (B[l + 1] - B[start])
                    total += sp.selection_macs(cur, k, self.scorer, self.fuse)
                    start, cur = l + 1, k + (1 if self.fuse else 0)
            total += cur * (A[self.L] - A[start]) + cur * cur * (B[self.L] - B[start])
            total = float(total)
        if drops is None:
            self._macs = total
        return total

    def _rows(self, i: int) -> float:
        l = self.pair_layer[i]
        if self.is_cnn:
            return 1.0
        if l >= 0:
            return float(self.tokens_per_layer()[l])
        return float(self.spec.rows_for_weight(self.pair_names[i], self.tokens_per_layer()))

    # ---------------------------------------------------------------- steps
    def slots(self) -> list[tuple[str, int]]:
        out = [("heads", l) for l in range(self.L) if "heads" in self.targets]
        out += [("tokens", s) for s in range(len(self.token_layers))]
        out += [("pairs", i) for i in range(len(self.pair_names))]
        return out

    def evaluate(self, kind: str, i: int) -> tuple[float, float] | None:
        """(dloss, dflops) of the next step of slot (kind, i) in the current state, or None if exhausted."""
        if kind == "heads":
            r = self.removed[i]
            if r >= self.max_removed[i]:
                return None
            n = self.tokens_per_layer()[i]
            raw = self.heads_raw()
            dl = self._f("heads", raw + float(self.head_cost[i][r])) - self._f("heads", raw)
            return dl, 2.0 * self.spec.head_block_macs(n)
        if kind == "tokens":
            step, donor = self._token_move(i)
            if step <= 0:
                return None
            new = list(self.drops)
            new[i] += step
            if donor is not None:
                new[donor] -= step
            dl = self.token_loss(new) - self.token_loss()
            df = self.effective_macs() - self.effective_macs(new)
            return dl, 2.0 * df
        s = self.pstep[i]
        if s + 1 >= len(self.pair_sparsity[i]):
            return None
        raw = self.pairs_raw()
        dl = self._f("pairs", raw + float(self.pair_loss[i][s + 1] - self.pair_loss[i][s])) - self._f("pairs", raw)
        du = self.pair_unit[i][s + 1] - self.pair_unit[i][s]
        return float(dl), 2.0 * du * self._rows(i)

    def _token_step(self, i: int) -> int:
        """Tokens the next step of stage ``i`` drops: ``token_step``, or when it opens the stage, the fewest that
        pay for its overhead (scorer, fused token: with ``fuse_dropped`` dropping one token saves nothing)."""
        room = self.keeps()[-1] - self.min_keep
        if room <= 0:
            return 0
        step = min(self.token_step, room)
        if self.drops[i] == 0:
            base = self.effective_macs()
            new = list(self.drops)
            while step < room:
                new[i] = step
                if base - self.effective_macs(new) > 0:
                    break
                step += 1
        return step

    def _token_move(self, i: int) -> tuple[int, int | None]:
        """(tokens, donor stage) of the next step of stage ``i``: ``(_token_step(i), None)`` while the last stage
        can still drop; once it keeps ``min_keep``, a *move* of ``token_step`` drops from the next later stage
        ``j`` that drops any (``drops[i] += n, drops[j] -= n``; when it opens stage ``i``, the fewest that pay
        for its overhead). ``(0, None)``: exhausted."""
        step = self._token_step(i)
        if step > 0 or self.keeps()[-1] > self.min_keep:
            return step, None
        for j in range(i + 1, len(self.drops)):
            dj = self.drops[j]
            if dj > 0:
                step = min(self.token_step, dj)
                if self.drops[i] == 0:
                    base = self.effective_macs()
                    new = list(self.drops)
                    while step < dj:
                        new[i], new[j] = step, dj - step
                        if base - self.effective_macs(new) > 0:
                            break
                        step += 1
                return step, j
        return 0, None

    def apply(self, kind: str, i: int) -> tuple[int, int, str]:
        """Take the next step of slot (kind, i); returns the Action's (layer, index, name)."""
        self._dirty(blocks=kind != "tokens")
        if kind == "heads":
            h = int(self.head_order[i][self.removed[i]])
            self.removed[i] += 1
            return i, h, ""
        if kind == "tokens":
            step, donor = self._token_move(i)
            self._dirty(blocks=False)  # _token_move cached the state before the drop
            self.drops[i] += step
            if donor is not None:
                self.drops[donor] -= step
            return self.token_layers[i], i, ""
        s = self.pstep[i]
        self.pstep[i] = s + 1
        l = self.pair_layer[i]
        self.unit_in[l if l >= 0 else self.L] += self.pair_unit[i][s + 1] - self.pair_unit[i][s]
        return l, s + 1, self.pair_names[i]

    def replay(self, actions: Iterable[Action]) -> None:
        self.reset()
        index = {n: i for i, n in enumerate(self.pair_names)}
        for a in actions:
            for b in a.before + (a,):
                if b.kind == "heads":
                    self.apply("heads", b.layer)
                elif b.kind == "tokens":
                    self.apply("tokens", b.index)
                else:
                    self.apply("pairs", index[b.name])

    # ---------------------------------------------------------------- greedy
    def greedy(self) -> Pareto:
        self.reset()
        heap: list[tuple[tuple[int, float, float], int, str, int, int]] = []
        version: dict[tuple[str, int], int] = {}
        seq = 0

        def key(dl: float, df: float) -> tuple[int, float, float]:
            if df <= 0:
                return (2, -df, dl)  # saves nothing: last, least harmful first
            if dl <= _TINY:
                return (0, -df, dl)  # free: biggest saving first
            return (1, -df / dl, dl)

        for slot in self.slots():
            ev = self.evaluate(*slot)
            if ev is not None:
                version[slot] = 0
                heapq.heappush(heap, (key(*ev), seq, slot[0], slot[1], 0))
                seq += 1
        actions: list[Action] = []
        loss = [0.0]
        flops = [2.0 * self.effective_macs()]
        cur_loss = prev_tok = 0.0
        while heap:
            k, _, kind, i, ver = heapq.heappop(heap)
            slot = (kind, i)
            if version.get(slot) != ver:
                continue
            ev = self.evaluate(kind, i)
            if ev is None:
                version.pop(slot, None)
                continue
            nk = key(*ev)
            if heap and nk > heap[0][0] and nk != k:  # lost its place: re-queue with the fresh key
                version[slot] = ver + 1
                heapq.heappush(heap, (nk, seq, kind, i, ver + 1))
                seq += 1
                continue
            if nk[0] == 2:  # nothing left that saves FLOPs
                break
            layer, index, name = self.apply(kind, i)
            if kind == "tokens":
                tok_loss = self.token_loss()
                cur_loss += tok_loss - prev_tok
                prev_tok = tok_loss
            else:
                cur_loss += ev[0]
            f = 2.0 * self.effective_macs()
            # A token move can LOWER the predicted loss (the donor stage's curve is steeper at its keep). The
            # stage-2 maps need a raw loss that is monotone along the curve, so the curve keeps to its
            # non-dominated front: the points this step beats (more loss AND more FLOPs) are dropped, their
            # steps folded into this action's ``before`` (replayed first), so every reported point is still a
            # state the greedy visited and point i is still the plan of actions[:i]. (Combining moves instead
            # would need look-ahead; dropping dominated points never makes a budget's plan worse.)
            before: list[Action] = []
            while len(loss) > 1 and loss[-1] > cur_loss:
                a = actions.pop()
                before[:0] = list(a.before) + [Action(a.kind, a.layer, a.index, a.dloss, a.dflops, a.name)]
                loss.pop()
                flops.pop()
            actions.append(Action(kind, layer, index, float(cur_loss - loss[-1]), float(flops[-1] - f), name,
                                  tuple(before)))
            loss.append(cur_loss)
            flops.append(f)
            nxt = self.evaluate(kind, i)
            version[slot] = ver + 1
            if nxt is not None:
                heapq.heappush(heap, (key(*nxt), seq, kind, i, ver + 1))
                seq += 1
        raw = np.asarray(loss)
        mapped = raw
        if self.lmap is not None:  # stage 2: the target set's measured curve (monotone: same points, new values)
            mapped = np.asarray(self.lmap(raw), dtype=np.float64).reshape(-1)
            actions = [Action(a.kind, a.layer, a.index, float(mapped[j + 1] - mapped[j]), a.dflops, a.name, a.before)
                       for j, a in enumerate(actions)]
        return Pareto(
            loss=mapped, flops=np.asarray(flops), flops_dense=float(flops[0]), actions=tuple(actions),
            targets=self.targets, token_layers=self.token_layers, granularity=self.granularity, scorer=self.scorer,
            fuse_dropped=self.fuse, _problem=self, raw_loss=raw if self.lmap is not None else None,
        )

    def _total_loss(self) -> float:
        return float(sum(self.loss_by_target().values()))

    def refine(self, budget: float) -> None:
        """Fill the budget left at the current state with the best-ratio steps that still fit."""
        while True:
            left = budget - self._total_loss()
            best, best_r = None, -1.0
            for slot in self.slots():
                ev = self.evaluate(*slot)
                if ev is None or ev[1] <= 0:
                    continue
                dl = ev[0]
                if dl > left + 1e-15:
                    continue
                r = ev[1] / max(dl, _TINY)
                if r > best_r:
                    best, best_r = slot, r
            if best is None:
                return
            self.apply(*best)

    # ---------------------------------------------------------------- plans
    def make_plan(self, pareto: Pareto, budget: float, refine: bool) -> Plan:
        idx = pareto.index_for(budget)
        self.replay(pareto.actions[:idx])
        if refine:
            self.refine(budget if self.lmap is None else float(self.lmap.inverse(budget)))
        return self.current_plan(budget, idx, refine)

    def current_plan(self, budget: float | None, idx: int | None = None, refined: bool = False) -> Plan:
        meta = getattr(self.sens, "meta", None) or {}
        heads = {l: tuple(sorted(int(h) for h in self.head_order[l][: self.removed[l]])) for l in range(self.L) if self.removed[l]}
        tokens = tuple(TokenStage(int(l), int(k)) for l, k, d in zip(self.token_layers, self.keeps(), self.drops) if d > 0)
        scorers: dict[int, tuple[tuple[float, ...], float]] = {}
        if tokens and self.scorer == "linear":
            all_s = getattr(self.sens, "scorers", None) or {}
            by_l = {int(k): v for k, v in all_s.items()}
            for t in tokens:
                w, b = by_l[t.after_layer]
                scorers[t.after_layer] = (tuple(float(x) for x in np.asarray(w).reshape(-1)), float(np.asarray(b).reshape(-1)[0]))
        merges = []
        for i, s in enumerate(self.pstep):
            if s:
                name = self.pair_names[i]
                merges.append(self.pairing.make_merge(self.entries[name], self.granularity, float(self.pair_sparsity[i][s]), self.method, name=name))
        by_target = self.loss_by_target()
        raw_total = float(sum(by_target.values()))
        predicted = raw_total
        if self.lmap is not None:  # stage 2; the per-target split keeps its stage-1 proportions
            predicted = float(self.lmap(raw_total))
            by_target = {t: (v * predicted / raw_total if raw_total > 0 else 0.0) for t, v in by_target.items()}
        plan = Plan(
            fingerprint=str(meta.get("fingerprint", "")), family=self.family, geometry=dict(self.geometry),
            heads=heads, tokens=tokens, token_scorer=self.scorer, scorers=scorers,
            fuse_dropped=self.fuse if tokens else False, prefix_tokens=int(self.P if not self.is_cnn else self.geometry.get("prefix_tokens", 0) or 0),
            merges=tuple(merges), anchors={**dict(meta.get("anchors") or {}), **{m.weight: m.weight_sha for m in merges}},
            budget=budget,
            predicted_loss_change=predicted,
        )
        rep = model_flops(self.geometry, plan, family=self.family, seq_len=self.seq_len_arg)
        notes = {
            "planner": "greedy+refine" if refined else "greedy", "targets": list(self.targets),
            "token_layers": list(self.token_layers), "granularity": self.granularity if "pairs" in self.targets else None,
            "predicted_by_target": by_target, "calibration": {t: self.cal[t] for t in self.targets},
            "calibration_exponents": {t: self.gam[t] for t in self.targets},
            "calibration_curve": target_key(self.targets) if self.lmap is not None else None,
            "predicted_stage1": raw_total,
            "flops_effective": rep.effective, "flops_sparse_saved": rep.sparse_saved, "flops_overhead": rep.overhead,
            "reduction": rep.reduction, "pareto_index": idx,
        }
        if self.seq_len_arg is not None:
            notes["seq_len"] = int(self.seq_len_arg)
        return plan.replace(flops_dense=rep.dense, flops_pruned=rep.pruned, notes=notes)


# ---------------------------------------------------------------------------------------------- public API
def pareto(sens: Any, targets: Sequence[str] | str | None = None, token_layers: Sequence[int] | None = None,
           granularity: str = "unstructured", *, scorer: str = "cls_attention", fuse_dropped: bool = False,
           seq_len: int | None = None, min_keep: int | None = None, min_heads: int = 0, token_step: int = 1,
           sparsities: Sequence[float] | None = None, method: str = "camp") -> Pareto:
    """The greedy Pareto curve of predicted loss change vs effective FLOPs (see the module docstring).

    ``targets``: any of ``"heads"``, ``"tokens"``, ``"pairs"`` (default None: every target the
    sensitivities have); ``token_layers`` (default None: :func:`default_token_layers`); ``granularity``
    of weight merges (default ``"unstructured"``; ``"2:4"``, ``"channel"``); ``scorer`` the run-time token
    scorer (default ``"cls_attention"``; ``"linear"`` needs fitted scorers); ``fuse_dropped`` (default
    False); ``seq_len`` (default the geometry's; required for language models); ``min_keep`` tokens kept by
    the last stage (default prefix + 1); ``min_heads`` kept per layer (default 0: a layer may lose its
    attention); ``token_step`` tokens per step (default 1); ``sparsities`` merge grid (default 0.1..0.9);
    ``method`` of merges (default ``"camp"``, see :func:`heart_onnx.pairing.make_merge`).
    """
    prob = _Problem(sens, targets, token_layers, granularity, scorer, fuse_dropped, seq_len, min_keep, min_heads,
                    token_step, sparsities, method)
    return prob.greedy()


def plan(sens: Any, budget: float, targets: Sequence[str] | str | None = None, *, scorer: str = "cls_attention",
         fuse_dropped: bool = False, token_layers: Sequence[int] | None = None, granularity: str = "unstructured",
         refine: bool = False, curve: Pareto | None = None, **kw: Any) -> Plan:
    """The plan that maximises FLOPs saved with predicted loss change <= ``budget`` nats.

    Options as :func:`pareto` (defaults: every available target, ``scorer="cls_attention"``,
    ``fuse_dropped=False``, default token layers, ``granularity="unstructured"``); ``refine`` (default
    False) fills the leftover budget with steps off the curve; ``curve`` (default None) reuses a
    :class:`Pareto` computed with the same options (fast re-planning in a notebook). The plan records
    budget, predicted loss change (calibrated), dense and pruned FLOPs, and in ``notes`` the prediction
    per target, the calibration factors and the effective/sparse FLOPs.
    """
    b = check_budget(budget)
    if curve is None:
        curve = pareto(sens, targets, token_layers, granularity, scorer=scorer, fuse_dropped=fuse_dropped, **kw)
    return curve.to_plan(b, refine=refine)


def predict(sens: Any, plan: Plan, *, calibrated: bool = True) -> dict[str, float]:
    """Predicted loss change of any ``plan`` by target (``heads``, ``tokens``, ``pairs``) and ``total``.

    ``calibrated`` (default True) applies both calibration stages of ``sens.meta["calibration"]`` (the
    module docstring): stage 2 with the curve of the plan's ``notes["targets"]`` (a plan from the planner)
    if one is stored, else of the set of targets the plan prunes; the per-target values are scaled so they
    still add up to ``total``. Token stages use the nested rule with the curve of ``plan.token_scorer``.
    """
    cal = calibration_factors(sens) if calibrated else {t: 1.0 for t in TARGETS}
    gam = calibration_exponents(sens) if calibrated else {t: 1.0 for t in TARGETS}
    out = {"heads": 0.0, "tokens": 0.0, "pairs": 0.0}
    if any(len(v) for v in plan.heads.values()):
        h = getattr(sens, "head", None)
        if h is None:
            raise HeartError("the plan removes heads but these sensitivities have no head scores")
        h = np.clip(np.asarray(h, np.float64), 0.0, None)
        out["heads"] = _transform(float(sum(h[int(l), int(i)] for l, hs in plan.heads.items() for i in hs)), cal["heads"], gam["heads"])
    if plan.tokens:
        curve = _Problem._token_curve(sens, plan.token_scorer)
        if curve is None:
            raise HeartError("the plan prunes tokens but these sensitivities have no token scores")
        prev = curve.shape[1] - 1
        total = 0.0
        for t in sorted(plan.tokens, key=lambda t: t.after_layer):
            c = _monotone_curve(curve[t.after_layer])
            k = min(t.keep, prev)
            total += c[k] - c[prev]
            prev = k
        out["tokens"] = _transform(float(total), cal["tokens"], gam["tokens"])
    if plan.merges:
        from . import pairing

        entries = pairs_entries(sens)
        total = 0.0
        for m in plan.merges:
            if m.weight not in entries:
                raise HeartError(f"the plan merges {m.weight} but these sensitivities have no scores for it")
            total += pairing.predicted_loss(entries[m.weight], m)
        out["pairs"] = _transform(float(total), cal["pairs"], gam["pairs"])
    out["total"] = out["heads"] + out["tokens"] + out["pairs"]
    if calibrated and out["total"] > 0:
        cands = []
        noted = (plan.notes or {}).get("targets") if isinstance(plan.notes, Mapping) else None
        if noted:
            cands.append(list(noted))
        cands.append([t for t in TARGETS if out[t] > 0])
        for ts in cands:
            lmap = calibration_map(sens, ts)
            if lmap is not None:
                total = float(lmap(out["total"]))
                scale = total / out["total"]
                for t in TARGETS:
                    out[t] *= scale
                out["total"] = total
                break
    return out


def calibrate_curve(sens: Any, targets: Iterable[str], raw: Sequence[float], measured: Sequence[float], *,
                    store: bool = True) -> LossMap:
    """Fit the stage-2 :class:`~heart_onnx.loss_map.LossMap` of one target set from measured plans.

    ``raw``: the stage-1 predictions of plans on that set's Pareto curve (``Pareto.loss`` computed *without*
    a curve for the set, or ``Pareto.raw_loss``); ``measured``: their measured loss changes (nats, same
    order). With ``store`` (default True) it goes to ``sens.meta["calibration"]["curves"][target_key]``
    (JSON; it survives ``Sensitivities.save``/``load``). Re-fitting stage 1 (:func:`calibrate`) drops
    every stored curve (their raw axis changed).
    """
    ts = [t for t in TARGETS if t in set(targets)]
    if not ts:
        raise HeartError(f"calibrate_curve needs a target set (some of {', '.join(TARGETS)})")
    lmap = LossMap.fit(raw, measured)
    if store:
        meta = getattr(sens, "meta", None)
        if meta is None:
            raise HeartError("sensitivities have no meta dict to store the calibration in")
        cal = meta.setdefault("calibration", {})
        cal.setdefault("curves", {})[target_key(ts)] = lmap.to_dict()
    return lmap


def calibrate(sens: Any, measured: Iterable[tuple[Any, float]], *, model: str = "scale", store: bool = True) -> dict[str, Any]:
    """Fit per-target calibration so that predictions match measured loss changes.

    ``measured``: pairs ``(plan_or_prediction, measured_nats)`` where the first item is a
    :class:`~heart_onnx.plan.Plan` (its uncalibrated per-target prediction is computed from ``sens``) or
    a mapping ``{"heads": x, "tokens": y, "pairs": z}`` of uncalibrated predictions.

    ``model="scale"`` (default): calibrated = ``c_t * x_t`` per target, ``c >= 0`` minimising the *relative*
    error ``sum_j ((m_j - sum_t c_t x_jt) / m_j)^2`` (exact non-negative least squares over the target
    subsets); mixed plans are fine. ``model="power"``: calibrated = ``c_t * x_t ** g_t`` (components
    interact super-additively: removing more heads hurts more than the sum), fitted per target in log-log
    space from the measurements that prune only that target (with a single distinct prediction: ``g = 1``
    and the geometric-mean ratio; targets without such measurements keep their previous calibration). With ``store`` (default True) the result is written to
    ``sens.meta["calibration"]`` (factors, ``exponents``, ``model``, ``n``, worst relative error), which
    :func:`pareto`, :func:`plan` and :func:`predict` then use; this is stage 1 of the module docstring and
    replaces the whole dict, so stage-2 curves stored before are dropped. Returns that dict.
    """
    if model not in ("scale", "power"):
        raise HeartError(f"unknown calibration model {model!r}: use 'scale' or 'power'")
    rows, ys = [], []
    for item, m in measured:
        pred = predict(sens, item, calibrated=False) if isinstance(item, Plan) else dict(item)
        rows.append([float(pred.get(t, 0.0)) for t in TARGETS])
        ys.append(float(m))
    if not rows:
        raise HeartError("calibrate needs at least one (plan, measured loss change) pair")
    X, y = np.asarray(rows), np.asarray(ys)
    if not np.all(np.isfinite(X)) or not np.all(np.isfinite(y)):
        raise HeartError("calibration data contains nan or inf: measure the plans again")
    active = [j for j in range(len(TARGETS)) if np.any(X[:, j] != 0)]
    if not active:
        raise HeartError("the measured plans prune nothing the sensitivities predict: calibrate with non-empty plans")
    prev, prev_g = calibration_factors(sens), calibration_exponents(sens)
    factors, exps = dict(prev), {t: 1.0 for t in TARGETS}
    if model == "scale":
        w = 1.0 / np.maximum(np.abs(y), max(1e-6, 1e-3 * float(np.max(np.abs(y)))))
        Xw, yw = X * w[:, None], y * w
        best_c, best_err = np.zeros(len(TARGETS)), np.inf
        for mask in range(1, 1 << len(active)):
            cols = [active[j] for j in range(len(active)) if mask >> j & 1]
            c, *_ = np.linalg.lstsq(Xw[:, cols], yw, rcond=None)
            if np.any(c < 0):
                continue
            full = np.zeros(len(TARGETS))
            full[cols] = c
            err = float(np.sum((Xw @ full - yw) ** 2))
            if err < best_err - 1e-15:
                best_c, best_err = full, err
        for j in active:
            factors[TARGETS[j]] = float(best_c[j])
    else:
        fitted = []
        for j in active:
            only = (X[:, j] > 0) & (y > 0) & np.all(np.delete(X, j, axis=1) == 0, axis=1)
            lx, ly = np.log(X[only, j]), np.log(y[only])
            if len(lx) == 0:
                continue
            if np.ptp(lx) <= 1e-9:  # one distinct prediction: a pure factor (geometric mean of the ratios)
                g, logc = 1.0, float(np.mean(ly - lx))
            else:
                g, logc = np.polyfit(lx, ly, 1)
            factors[TARGETS[j]], exps[TARGETS[j]] = float(np.exp(logc)), float(g)
            fitted.append(TARGETS[j])
        if not fitted:
            raise HeartError("a power calibration needs measured plans that prune only one target "
                             "(e.g. heads-only plans at two budgets)")
        for t in TARGETS:
            if t not in fitted:
                exps[t] = prev_g[t]
    pred = np.array([sum(_transform(X[i, j], factors[t], exps[t]) for j, t in enumerate(TARGETS)) for i in range(len(y))])
    rel = np.abs(pred - y) / np.maximum(np.abs(y), 1e-12)
    result: dict[str, Any] = dict(factors)
    result.update(exponents=exps, model=model, n=int(len(y)), max_rel_error=float(rel.max()))
    if store:
        meta = getattr(sens, "meta", None)
        if meta is None:
            raise HeartError("sensitivities have no meta dict to store the calibration in")
        meta["calibration"] = result
    return result


def flops_report(sens_or_geometry: Any, plan_: Plan | None = None, *, seq_len: int | None = None) -> FlopsReport:
    """The FLOPs report of ``plan_`` for the model the sensitivities (or a geometry dict) describe."""
    if isinstance(sens_or_geometry, Mapping):
        return model_flops(sens_or_geometry, plan_, seq_len=seq_len)
    family, geo = _geometry(sens_or_geometry)
    return model_flops(geo, plan_, family=family, seq_len=seq_len)


__all__ = ["Action", "Pareto", "pareto", "plan", "predict", "calibrate", "calibrate_curve", "calibration_map",
           "target_key", "check_budget", "default_token_layers", "flops_report", "calibration_factors",
           "calibration_exponents", "MAX_BUDGET"]
