"""Baseline head/token importance scores with the same output interface as the Hessian scores.

``baseline(adapter, calib, method)`` returns a ``Sensitivities`` whose ``head``/``head_per_input``/
``token_per_input`` hold the baseline's per-input scores (higher = more important), so planners,
benchmarks and widgets treat every method alike. Only ``"fisher"`` is in nats (a loss estimate); the
others are rankings. Methods:

- ``magnitude``: ``||z_c||`` (L2 norm of the head's output over all tokens, or the token's hidden state);
- ``taylor``: first-order Taylor ``|g . z_c|`` of the labelled cross-entropy. With the label-free KL
  loss the gradient vanishes at the dense point (every score would be 0), so Taylor and Fisher always
  use cross-entropy: against the batch's labels when it has them, otherwise against labels *sampled*
  from the dense model's own predictive distribution (seeded);
- ``fisher``: ``1/2 (g . z_c)^2`` per input (mean over inputs = ``1/2 E[(g.z)^2]``). With sampled labels
  this is a one-sample estimate of ``1/2 z^T G z`` with G the Gauss-Newton matrix of the KL loss, i.e. of
  the same quantity the Hessian method computes; with true labels it is the empirical Fisher;
- ``random``: uniform random scores (seeded);
- ``cls_attention`` (tokens only): EViT's class-token attention of block ``l``, mean over heads.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import HeartError
from ..sensitivities import Sensitivities
from .heads import HeadPerturbation
from .loss import ce_loss
from .scorers import cls_attention_scores
from .tokens import TokenPerturbation

BASELINES = ("magnitude", "taylor", "fisher", "random", "cls_attention")


def sample_labels(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Labels drawn from ``softmax(logits)``: (B, C) -> (B,); LMs (B, T, V) -> (B, T) next-token targets."""
    p = torch.softmax(logits.detach().double().cpu(), -1)
    flat = p.reshape(-1, p.shape[-1])
    y = torch.multinomial(flat, 1, generator=gen).reshape(p.shape[:-1])
    if logits.ndim == 3:  # position t predicts t+1: ce_loss reads labels[:, 1:]
        y = torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], 1)
    return y.to(logits.device)


def _grad_scores(adapter, inputs, labels, method, do_heads, do_tokens, gen):
    from .api import math_attention

    params: list[torch.Tensor] = []
    L = list(range(adapter.num_layers))
    with contextlib.ExitStack() as st:
        st.enter_context(math_attention())
        hp = st.enter_context(HeadPerturbation(adapter, L, params)) if do_heads else None
        tp = st.enter_context(TokenPerturbation(adapter, L, params)) if do_tokens else None
        out = adapter.forward(inputs)
    if labels is None:
        labels = sample_labels(out, gen)
    loss = ce_loss(out, labels).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    res = {}
    for name, pert in (("head", hp), ("token", tp)):
        if pert is None:
            continue
        gz = torch.stack([(pert.view(grads[i]) * pert.view(z)).sum(-1) for i, z in zip(pert.slots, pert.z)], 1)  # (B, L, C)
        res[name] = (gz.abs() if method == "taylor" else 0.5 * gz ** 2).double().cpu().numpy()
    return res


def baseline(adapter, calib: Iterable, method: str = "magnitude", targets: Sequence[str] = ("heads", "tokens"),
             loss: str = "kl", seed: int = 0, max_batches: int | None = None) -> Sensitivities:
    """Baseline scores over ``calib`` (see the module docstring); defaults ``method="magnitude"``,
    ``targets=("heads", "tokens")``, ``seed=0``, ``max_batches=None``. ``loss`` is recorded only
    (Taylor/Fisher always use cross-entropy)."""
    from .api import _adapter, _fingerprint, probe_generator, split_batch, to_device

    adapter = _adapter(adapter)
    if method not in BASELINES:
        raise HeartError(f"unknown method {method!r}: choose hessian or one of {', '.join(BASELINES)}")
    do_heads, do_tokens = "heads" in targets, "tokens" in targets
    if method == "cls_attention" and do_heads:
        raise HeartError("cls_attention scores tokens only: use --targets tokens")
    model = adapter.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    L, P = adapter.num_layers, int(adapter.prefix_tokens or 0)
    heads, toks = [], []
    for i, batch in enumerate(calib):
        if max_batches is not None and i >= max_batches:
            break
        inputs, labels = split_batch(batch)
        inputs, labels = to_device(inputs, device), to_device(labels, device)
        gen = probe_generator(seed, i, 2)
        if method in ("taylor", "fisher"):
            r = _grad_scores(adapter, inputs, labels, method, do_heads, do_tokens, gen)
            if do_heads:
                heads.append(r["head"])
            if do_tokens:
                t = r["token"]
                t[:, :, :P] = np.nan
                toks.append(t)
            continue
        with torch.no_grad(), contextlib.ExitStack() as st:
            hp = st.enter_context(HeadPerturbation(adapter, range(L))) if do_heads else None
            tp = st.enter_context(TokenPerturbation(adapter, range(L))) if do_tokens else None
            boxes = [st.enter_context(adapter.attention_probs(l)) for l in range(L)] if method == "cls_attention" else []
            adapter.forward(inputs)
        for pert, acc in ((hp, heads), (tp, toks)):
            if pert is None:
                continue
            B, C = pert.view(pert.z[0]).shape[:2]
            if method == "magnitude":
                s = torch.stack([pert.view(z).norm(dim=-1) for z in pert.z], 1).double().numpy()  # (B, L, C)
            elif method == "random":
                s = torch.rand(B, L, C, generator=gen, dtype=torch.float64).numpy()
            else:  # cls_attention, tokens
                s = np.stack([cls_attention_scores(b.value, P) for b in boxes], 1)
            if pert is tp:
                s[:, :, :P] = np.nan
            acc.append(s)
    if was_training:
        model.train()
    if not heads and not toks:
        raise HeartError("the calibration set is empty: give at least one batch")
    sens = Sensitivities(meta={
        "family": adapter.family, "fingerprint": _fingerprint(model), "geometry": adapter.geometry(), "method": method,
        "loss": "ce" if method in ("taylor", "fisher") else loss, "seed": int(seed), "targets": list(targets),
        "units": "nats" if method == "fisher" else "score",
    })
    if heads:
        sens.head_per_input = np.concatenate(heads, 0)
        sens.head = sens.head_per_input.mean(0)
    if toks:
        sens.token_per_input = np.concatenate(toks, 0)
    sens.meta["n_samples"] = int((sens.head_per_input if heads else sens.token_per_input).shape[0])
    return sens


def plannable(sens: Sensitivities, scorer_scores: np.ndarray | None = None, scorer: str = "cls_attention",
              normalise: str | bool = "auto", head_from: Sensitivities | None = None) -> Sensitivities:
    """Baseline scores in the form the planner reads: ``head`` (L, H) and ``token_keep_curve(s)`` (L, N+1).

    ``scorer_scores`` (S, L, N): the run-time token scorer's values on the same inputs (e.g. the
    ``token_per_input`` of ``baseline(..., method="cls_attention")``): the keep curve entry ``[l, K]`` is the
    mean over inputs of the method's scores of the ``N-K`` tokens that scorer drops (``tokens.keep_curve_sums``,
    the rule ``analyze`` uses for Hessian scores), stored under ``scorer`` (default ``"cls_attention"``).
    ``normalise`` (default ``"auto"``: when ``meta["units"]`` is not nats): scale heads so all heads sum to 1
    and tokens so the mean over inputs of all tokens of all layers sums to 1, so that heads and tokens of a
    ranking-only method (magnitude, random, class-token attention) trade off by their *share* of the total.
    ``head_from`` (default None): take ``head`` from these sensitivities instead (e.g. class-token attention
    has no head scores). Returns a new ``Sensitivities`` (same meta, ``meta["plannable"]`` records the choices).
    """
    from .tokens import keep_curve_sums

    if normalise == "auto":
        normalise = sens.meta.get("units") != "nats" or (head_from is not None and head_from.meta.get("units") != "nats")
    P = int((sens.meta.get("geometry") or {}).get("prefix_tokens", 0) or 0)
    out = Sensitivities(meta={**sens.meta, "plannable": {"scorer": scorer, "normalise": bool(normalise),
                                                         "heads_from": (head_from or sens).meta.get("method")}})
    src = head_from if head_from is not None else sens
    if src.head is not None:
        h = np.clip(np.nan_to_num(np.asarray(src.head, np.float64)), 0.0, None)
        out.head = h / max(h.sum(), 1e-300) if normalise else h
        out.head_per_input = src.head_per_input
    if sens.token_per_input is not None:
        if scorer_scores is None:
            raise HeartError("token keep curves need the run-time scorer's scores on the same inputs (scorer_scores)")
        t = np.clip(np.asarray(sens.token_per_input, np.float64), 0.0, None)  # (S, L, N), prefix nan
        if t.shape != np.shape(scorer_scores):
            raise HeartError(f"scorer scores have shape {np.shape(scorer_scores)}, token scores {t.shape}: score the same inputs")
        if normalise:
            t = t / max(float(np.nansum(t)) / t.shape[0], 1e-300)
        curve = keep_curve_sums(t, np.asarray(scorer_scores, np.float64), P) / t.shape[0]
        curve[:, :P] = np.nan
        out.token_per_input = t
        out.token_keep_curve = curve
        out.token_keep_curves = {scorer: curve}
    return out
