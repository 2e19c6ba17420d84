"""``analyze``: second-order head/token sensitivities over a calibration set -> ``Sensitivities``.

    sens = heart_onnx.analyze(model, calib, targets=("heads", "tokens"))

Per calibration batch: one forward with perturbation hooks (heads: ``heads.HeadPerturbation``, tokens:
``tokens.TokenGates``), then one of two estimators of ``-g.z + 1/2 z^T H z`` per component:

- ``estimator="ggn"`` (default for the label-free KL loss): at the dense point H is the Gauss-Newton
  matrix and ``z^T H z = E_{y~p}[(grad log p_y . z)^2]``, so each output-space backward scores every
  head and token of every layer at once; classifiers with <= 64 classes enumerate y (EXACT, e.g. 10
  backwards for digits), otherwise ``probes`` labels are sampled (unbiased, never negative). It also
  gives each token group's full quadratic (cross terms included) for the keep curves.
- ``estimator="hvp"`` (any loss, e.g. labelled CE): ``probes`` random-sign HVP probes (``probes.py``).

Default probe count ``DEFAULT_PROBES = 32``, from ``benchmarks/sensitivity_quality.py`` on the demo ViT
(32 calibration images, HVP probes vs exact per-component HVPs, shipped weights): aggregated head ranking
Spearman 0.61 / 0.77 / 0.76 / 0.90 / 0.95 at 1 / 8 / 16 / 32 / 64 probes (an earlier checkpoint: 0.66 /
0.78 / 0.85 / 0.90 / 0.92); 32 is the smallest count at >= 0.9 in both. Per-input token rankings converge
much more slowly (0.37 at 8, 0.56 at 32, 0.66 at 64), which is why the KL default is the exact/sampled
GGN estimator (per-input token Spearman vs measured single-token drops 0.9 on the same model).
Token targets also fit the linear run-time scorer (``scorers.py``) on the first ``1 - holdout`` of the
batches and report both scorers' ranking quality on the rest.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import HeartError
from ..sensitivities import Sensitivities
from . import distributed as D
from .heads import HeadPerturbation
from .hvp import HVP
from .probes import ggn_scores
from .loss import LOSSES, capture_lm_head, lm_kl_chunked, output_head, per_input_loss
from .scorers import QualityAccumulator, RidgeStats, cls_attention_scores, linear_scores, log_target
from .tokens import TokenGates, TokenPerturbation, gates_supported, group_curve_sums, keep_curve_sums

DEFAULT_PROBES = 32
TARGETS = ("heads", "tokens", "pairs")
METHODS = ("hessian", "magnitude", "taylor", "fisher", "random", "cls_attention")


# ------------------------------------------------------------------------------------------ batches
def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """A calibration batch -> ``(inputs, labels or None)``.

    Accepted: a tensor; ``(inputs, labels)`` / ``[inputs, labels]`` (labels an integer tensor, or None as
    ``heart_onnx.data.load_data`` yields for unlabelled sources); a dict
    of model kwargs (``labels`` popped if present).
    """
    if isinstance(batch, dict):
        b = dict(batch)
        return b, b.pop("labels", None)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2 and (batch[1] is None or (isinstance(batch[1], torch.Tensor) and not batch[1].is_floating_point())):
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        return tuple(batch), None
    return batch, None


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def batch_size_of(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, dict):
        return next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    return batch_size_of(inputs[0])


def probe_generator(seed: int, batch_index: int, stream: int = 0) -> torch.Generator:
    """CPU generator for batch ``batch_index`` (independent of rank and device)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(batch_index)) * 7 + stream)


# --------------------------------------------------------------------------------------------- loss
def math_attention():
    """Context forcing ``F.scaled_dot_product_attention`` onto its MATH kernel (fused kernels have no
    double backward); a no-op context where ``torch.nn.attention`` is missing."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


class Objective:
    """Per-input loss of the adapter's output (``name`` in ``LOSSES``); ``__call__`` returns the batch sum.

    Language models with ``loss="kl"`` use the chunked LM-head KL (``loss.lm_kl_chunked``, dense point)
    unless ``chunked=False``.
    """

    def __init__(self, adapter, name: str = "kl", chunked: bool = True):
        if name not in LOSSES:
            raise HeartError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
        self.adapter, self.name = adapter, name
        self.chunked = chunked and name == "kl" and getattr(adapter, "kind", "") == "lm" and output_head(adapter.model) is not None

    def __call__(self, inputs: Any, labels: torch.Tensor | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
        with math_attention():
            return self._call(inputs, labels, target)

    def _call(self, inputs: Any, labels: torch.Tensor | None, target: torch.Tensor | None) -> torch.Tensor:
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        if self.chunked and target is None:
            with capture_lm_head(self.adapter.model) as box:
                self.adapter.forward(inputs)
            return lm_kl_chunked(box["hidden"], box["weight"], box["bias"], mask=mask)
        out = self.adapter.forward(inputs)
        if self.name == "ce" and labels is None:
            raise HeartError("loss 'ce' needs labelled calibration batches (inputs, labels): use --loss kl for unlabelled data")
        return per_input_loss(self.name, out, target, labels, mask).sum()


# ----------------------------------------------------------------------------------------- analyze
def _adapter(model_or_adapter):
    from ..models.base import ModelAdapter

    if isinstance(model_or_adapter, ModelAdapter):
        return model_or_adapter
    from ..models.registry import adapt

    return adapt(model_or_adapter)


def _fingerprint(model) -> str:
    try:
        from ..models.fingerprint import fingerprint

        return fingerprint(model)
    except ImportError:  # pragma: no cover
        return ""


def _probs_ctx(adapter, layers: Sequence[int]):
    stack = contextlib.ExitStack()
    boxes = [stack.enter_context(adapter.attention_probs(l)) for l in layers]
    return stack, boxes


def analyze(model_or_adapter, calib: Iterable, targets: Sequence[str] = ("heads", "tokens"), method: str = "hessian",
            probes: int = DEFAULT_PROBES, loss: str = "kl", seed: int = 0, exact: bool = False, holdout: float = 0.25,
            token_scorer: str = "cls_attention", ridge: float = 1e-3, token_mode: str = "auto",
            estimator: str = "auto", max_batches: int | None = None, progress: Any = None) -> Sensitivities:
    """Sensitivities of heads and/or tokens of a model over calibration batches.

    ``calib``: an iterable of batches (tensor, ``(inputs, labels)`` or a dict of model kwargs), e.g. a
    DataLoader. Options (defaults): ``targets=("heads", "tokens")`` (``"pairs"`` runs
    ``sensitivity.pairs`` when present); ``method="hessian"`` (or a baseline from ``baselines.py``:
    ``magnitude``, ``taylor``, ``fisher``, ``random``, ``cls_attention``); ``probes=32`` random-sign
    probes (hvp) or sampled labels (ggn, when not enumerated) per batch; ``loss="kl"`` (label-free, against the dense model; ``ce`` needs
    labels; ``mse``/``cosine`` for embedding models); ``seed=0``; ``exact=False`` (True: one HVP per
    component, slow reference); ``holdout=0.25`` of the batches (taken from the end) held out to fit-check
    the linear token scorer; ``token_scorer="cls_attention"`` names the curve in ``token_keep_curve``
    (``"linear"``, ``"cls_attention"`` or ``"oracle"``); ``ridge=1e-3``; ``token_mode="auto"``: ``"gate"``
    (exact drop model, see ``tokens.py``) where the attention probabilities can be gated, else
    ``"hidden"`` (HEART-ViT hidden-state erasure); ``estimator="auto"``: ``"ggn"`` for the KL loss (output-space
    gradients, ``probes.ggn_scores``: exact for classifiers with <= 64 classes, else ``probes`` sampled labels;
    never negative) and ``"hvp"`` (random-sign HVP probes) for other losses; ``max_batches=None``;
    ``progress`` a callable ``(done, total)``. Runs distributed when a torch.distributed process group is
    initialised (see ``distributed.py``).
    """
    t0 = time.time()
    adapter = _adapter(model_or_adapter)
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise HeartError(f"unknown target(s) {bad}: choose from {', '.join(TARGETS)}")
    if method != "hessian":
        from .baselines import baseline

        return baseline(adapter, calib, method=method, targets=[t for t in targets if t != "pairs"], loss=loss, seed=seed,
                        max_batches=max_batches)
    if probes < 1 and not exact:
        raise HeartError("probes must be >= 1 (or pass exact=True)")
    if token_scorer not in ("linear", "cls_attention", "oracle"):
        raise HeartError(f"unknown token scorer {token_scorer!r}: choose linear, cls_attention or oracle")
    do_heads, do_tokens = "heads" in targets, "tokens" in targets
    if do_heads and not adapter.num_heads:
        raise HeartError(f"{adapter.family} models have no attention heads: use --targets pairs")
    if do_tokens and (getattr(adapter, "kind", "") == "lm" or adapter.seq_len is None):
        raise HeartError("token pruning needs a fixed-length encoder (ViT/DeiT): use --targets heads for language models")

    if do_tokens:
        if token_mode == "auto":
            token_mode = "gate" if gates_supported(adapter) else "hidden"
        if token_mode not in ("gate", "hidden"):
            raise HeartError(f"unknown token_mode {token_mode!r}: choose auto, gate or hidden")
        if token_mode == "gate" and not gates_supported(adapter):
            raise HeartError(f"{adapter.family} attention probabilities cannot be gated: use token_mode='hidden'")
    TokenCtx = TokenGates if token_mode == "gate" else TokenPerturbation
    if estimator == "auto":
        estimator = "ggn" if loss == "kl" and not exact else "hvp"
    if estimator not in ("ggn", "hvp"):
        raise HeartError(f"unknown estimator {estimator!r}: choose auto, ggn or hvp")
    if estimator == "ggn" and loss != "kl":
        raise HeartError("estimator 'ggn' needs the KL loss (its Hessian at the dense point is Gauss-Newton): use estimator='hvp'")
    batches = list(calib)
    if max_batches is not None:
        batches = batches[:max_batches]
    if not batches:
        raise HeartError("the calibration set is empty: give at least one batch")
    model = adapter.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    objective = Objective(adapter, loss)
    L, P = adapter.num_layers, int(adapter.prefix_tokens or 0)
    layers = list(range(L))
    n_hold = int(math.floor(len(batches) * holdout)) if do_tokens and len(batches) >= 2 else 0
    n_fit = len(batches) - n_hold

    per_head: list[tuple[int, np.ndarray]] = []
    per_token: list[tuple[int, np.ndarray]] = []
    curves: dict[str, np.ndarray] = {}
    ridge_stats: list[RidgeStats] | None = None
    q_cls, q_lin = QualityAccumulator(L), QualityAccumulator(L)
    lin_curve = None
    fitted: dict[int, tuple[np.ndarray, float]] = {}
    n_done = 0

    def run_batch(i: int, phase: int) -> None:
        nonlocal ridge_stats, lin_curve
        inputs, labels = split_batch(batches[i])
        inputs, labels = to_device(inputs, device), to_device(labels, device)
        params: list[torch.Tensor] = []
        with contextlib.ExitStack() as stack:
            hp = stack.enter_context(HeadPerturbation(adapter, layers, params)) if do_heads else None
            tp = stack.enter_context(TokenCtx(adapter, layers, params)) if do_tokens else None
            boxes = [stack.enter_context(adapter.attention_probs(l)) for l in layers] if do_tokens else []
            if estimator == "hvp":
                op = HVP(lambda: objective(inputs, labels), params)
            else:
                with math_attention():
                    logits = adapter.forward(inputs)
        if estimator == "ggn":
            mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            perts = [p for p in (hp, tp) if p is not None]
            got = dict(zip([id(p) for p in perts], ggn_scores(logits, params, perts, probes, probe_generator(seed, i, 0), mask,
                                                              keep_dots=[tp] if tp is not None else [])))
            if hp is not None:
                per_head.append((i, got[id(hp)].numpy()))
            if tp is not None:
                ts = got[id(tp)].numpy()
                ts[:, :, :P] = np.nan
            del logits
        if hp is not None and estimator == "hvp":
            per_head.append((i, hp.scores(op, probes, probe_generator(seed, i, 0), exact).numpy()))
        if tp is not None:
            if estimator == "hvp":
                ts = tp.scores(op, probes, probe_generator(seed, i, 1), exact).numpy()  # (B, L, N)
            per_token.append((i, ts))
            cls = np.stack([cls_attention_scores(b.value, P) for b in boxes], 1)  # (B, L, N)
            def add_curves(name, sc):
                # main curve: sum of single-token scores (ranks measured group drops best, see
                # benchmarks/sensitivity_quality.py); "<name>_group": the group's full GGN quadratic
                curves[name] = curves.get(name, 0) + keep_curve_sums(ts, sc, P)
                if estimator == "ggn":
                    curves[name + "_group"] = curves.get(name + "_group", 0) + group_curve_sums(tp.ggn_dots, tp.ggn_weights, sc, P)
            for name, sc in (("cls_attention", cls), ("oracle", ts)):
                add_curves(name, sc)
            if phase == 0:
                if ridge_stats is None:
                    ridge_stats = [RidgeStats(tp.hidden[0].shape[-1]) for _ in layers]
                for j in layers:
                    x = tp.hidden[j][:, P:, :].reshape(-1, tp.hidden[j].shape[-1]).double().cpu().numpy()
                    ridge_stats[j].add(x, log_target(ts[:, j, P:]).reshape(-1))
            else:
                lin = np.stack([linear_scores(tp.hidden[j], *fitted[j], P) for j in layers], 1)  # (B, L, N)
                q_cls.add(cls, ts, P)
                q_lin.add(lin, ts, P)
                add_curves("linear", lin)
        params.clear()

    mine = set(D.shard(len(batches))) if (do_heads or do_tokens) else set()
    for phase, idx in ((0, range(n_fit)), (1, range(n_fit, len(batches)))):
        for i in idx:
            if i in mine:
                run_batch(i, phase)
            n_done += 1
            if progress is not None:
                progress(n_done, len(batches))
        if phase == 0 and do_tokens:
            dim = adapter.hidden_size or (ridge_stats[0].xtx.shape[0] - 1 if ridge_stats else 0)
            for j in layers:
                st = ridge_stats[j] if ridge_stats else RidgeStats(dim)
                flat = D.all_reduce_sum(np.concatenate([st.xtx.ravel(), st.xty, [st.n]]))
                m = st.xtx.shape[0]
                st.xtx, st.xty, st.n = flat[:m * m].reshape(m, m), flat[m * m:m * m + m], int(flat[-1])
                fitted[j] = st.solve(ridge)
    if was_training:
        model.train()

    sens = Sensitivities(meta={
        "family": adapter.family, "fingerprint": _fingerprint(model), "geometry": adapter.geometry(), "method": "hessian",
        "loss": loss, "probes": None if exact else int(probes), "exact": bool(exact), "seed": int(seed),
        "targets": list(targets), "world_size": D.rank_world()[1], "estimator": estimator,
    })
    n_samples = 0
    if do_heads:
        hpi = np.concatenate(D.gather_indexed(per_head), 0)  # (S, L, H)
        sens.head_per_input, sens.head = hpi, hpi.mean(0)
        n_samples = hpi.shape[0]
    if do_tokens:
        tpi = np.concatenate(D.gather_indexed(per_token), 0)  # (S, L, N)
        sens.token_per_input = tpi
        S = tpi.shape[0]
        n_samples = S
        N = tpi.shape[-1]
        n_h = 0
        if n_hold:
            state = D.all_reduce_sum(np.concatenate([q_cls.state(), q_lin.state()]))
            n_h = int(state[-1])
        names = ["cls_attention", "oracle"] + (["linear"] if n_hold else [])
        names += [n + "_group" for n in names] if estimator == "ggn" else []
        for name in names:
            denom = n_h if name.startswith("linear") else S
            sens.token_keep_curves[name] = D.all_reduce_sum(np.nan_to_num(curves.get(name, np.zeros((L, N + 1))), nan=0.0)) / max(denom, 1)
            sens.token_keep_curves[name][:, :P] = np.nan
        if n_hold:
            state = D.all_reduce_sum(np.concatenate([q_cls.state(), q_lin.state()]))
            half = len(state) // 2
            sens.scorer_quality = {"cls_attention": QualityAccumulator.report(state[:half]),
                                   "linear": QualityAccumulator.report(state[half:]),
                                   "held_out_batches": n_hold, "fit_batches": n_fit}
        sens.scorers = fitted
        chosen = token_scorer if token_scorer in sens.token_keep_curves else "cls_attention"
        sens.token_keep_curve = sens.token_keep_curves[chosen]
        sens.meta["token_scorer"] = chosen
        sens.meta["holdout_batches"] = n_hold
        sens.meta["token_mode"] = token_mode
    if not n_samples:
        n_samples = sum(batch_size_of(split_batch(b)[0]) for b in batches)
    sens.meta["n_samples"] = int(n_samples)
    if "pairs" in targets:
        try:
            from ..pairing import pack
            from .pairs import weight_sensitivities
        except ImportError:
            raise HeartError("weight-pair sensitivities are not available in this build (heart_onnx.sensitivity.pairs)") from None
        sens.pairs.update(pack(weight_sensitivities(adapter, batches, loss="ce" if loss == "ce" else "kl", seed=seed)))
        sens.meta["pairs"] = True
    sens.meta["time_s"] = round(time.time() - t0, 3)
    return sens
