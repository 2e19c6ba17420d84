"""Run-time token scorers: what the pruned graph computes to choose tokens, and how well it ranks them.

(a) ``"cls_attention"`` (EViT): mean over heads of the class token's attention row in block ``l``,
    ``A[:, :, 0, P:]`` (from ``adapter.attention_probs``); no parameters.
(b) ``"linear"``: ``s = x[:, P:, :] @ w + b`` on the hidden state leaving block ``l`` (one MatMul in the
    graph), fitted by ridge least squares on calibration inputs to ``log`` of the per-input Hessian token
    sensitivities (floored at ``1e-4`` of the input's largest score at that layer), so that the
    scorer's ``softmax`` over dropped tokens (``Plan.fuse_dropped``) weights them by sensitivity.

Quality is reported on held-out inputs as the Spearman correlation with the Hessian scores and the
overlap of the top-K sets (K = half of the non-prefix tokens), per layer and averaged.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

FLOOR = 1e-4


def cls_attention_scores(probs: torch.Tensor, prefix: int) -> np.ndarray:
    """(B, H, N, N) attention probabilities -> (B, N) scores, ``mean_h A[:, h, 0, :]``; prefix = nan."""
    s = probs.detach()[:, :, 0, :].mean(1).double().cpu().numpy()  # (B, N)
    s[:, :prefix] = np.nan
    return s


def log_target(y: np.ndarray) -> np.ndarray:
    """(B, N') Hessian token scores -> ridge regression target ``log(max(y, FLOOR * max_t y))``."""
    top = np.nanmax(y, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top) & (top > 0), top, 1.0)
    return np.log(np.maximum(y, FLOOR * top))


class RidgeStats:
    """Sufficient statistics of a ridge fit with an unpenalised bias, summable across batches/ranks."""

    def __init__(self, dim: int):
        self.xtx = np.zeros((dim + 1, dim + 1))
        self.xty = np.zeros(dim + 1)
        self.n = 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """``x`` (M, D) features, ``y`` (M,) targets."""
        xa = np.concatenate([np.asarray(x, dtype=np.float64), np.ones((len(x), 1))], axis=1)
        self.xtx += xa.T @ xa
        self.xty += xa.T @ np.asarray(y, dtype=np.float64)
        self.n += len(x)

    def solve(self, ridge: float = 1e-3) -> tuple[np.ndarray, float]:
        """``(w (D,), b)`` minimising ``|x w + b - y|^2 + ridge * trace(X^T X)/D * |w|^2`` (default ``ridge=1e-3``)."""
        d = self.xtx.shape[0] - 1
        reg = np.zeros(d + 1)
        reg[:d] = ridge * max(np.trace(self.xtx[:d, :d]) / max(d, 1), 1e-12)
        sol = np.linalg.solve(self.xtx + np.diag(reg), self.xty)
        return sol[:d].astype(np.float32), float(sol[d])


def linear_scores(x: torch.Tensor | np.ndarray, w: np.ndarray, b: float, prefix: int) -> np.ndarray:
    """Hidden states (B, N, D) -> (B, N) scores ``x @ w + b``; prefix = nan."""
    xn = x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    s = xn @ np.asarray(w, dtype=np.float64) + b
    s[:, :prefix] = np.nan
    return s


def _ranks(a: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(a, axis=-1, kind="stable"), axis=-1, kind="stable").astype(np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation along the last axis (no tie correction): (..., N) x2 -> (...)."""
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))
    return np.where(den > 0, (ra * rb).sum(-1) / np.where(den > 0, den, 1), np.nan)


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Fraction of the top-``k`` (largest) of ``a`` that are also top-``k`` of ``b``, along the last axis."""
    ta = np.argsort(-a, axis=-1, kind="stable")[..., :k]
    tb = np.argsort(-b, axis=-1, kind="stable")[..., :k]
    hit = (ta[..., :, None] == tb[..., None, :]).any(-1).sum(-1)
    return hit / k


class QualityAccumulator:
    """Sums of per-input, per-layer Spearman and top-K overlap of a scorer against Hessian token scores.

    Rows whose Hessian scores are all equal (e.g. after the last block of a class-token model, where
    dropping tokens changes nothing) have no ranking and are skipped.
    """

    def __init__(self, layers: int):
        self.sp = np.zeros(layers)
        self.ov = np.zeros(layers)
        self.cnt = np.zeros(layers)
        self.n = 0

    def add(self, scorer: np.ndarray, hessian: np.ndarray, prefix: int) -> None:
        """``scorer``, ``hessian``: (B, L, N) (prefix columns ignored)."""
        s, h = scorer[..., prefix:], np.nan_to_num(hessian[..., prefix:])
        k = max(1, s.shape[-1] // 2)
        ok = (h.max(-1) - h.min(-1)) > 1e-12 * np.maximum(np.abs(h).max(-1), 1e-300)  # (B, L)
        ok &= np.abs(h).max(-1) > 0
        self.sp += np.where(ok, np.nan_to_num(spearman(s, h)), 0).sum(0)
        self.ov += np.where(ok, topk_overlap(s, h, k), 0).sum(0)
        self.cnt += ok.sum(0)
        self.n += s.shape[0]

    def state(self) -> np.ndarray:
        return np.concatenate([self.sp, self.ov, self.cnt, [self.n]])

    @staticmethod
    def report(state: np.ndarray) -> dict[str, Any]:
        L = (len(state) - 1) // 3
        n, cnt = state[-1], state[2 * L:3 * L]
        if n == 0:
            return {}
        with np.errstate(invalid="ignore", divide="ignore"):
            sp, ov = state[:L] / cnt, state[L:2 * L] / cnt
        valid = cnt > 0
        return {"spearman": float(sp[valid].mean()) if valid.any() else float("nan"),
                "topk_overlap": float(ov[valid].mean()) if valid.any() else float("nan"),
                "spearman_per_layer": [float(x) if v else None for x, v in zip(sp, valid)],
                "topk_overlap_per_layer": [float(x) if v else None for x, v in zip(ov, valid)],
                "n_inputs": int(n), "k": "half of the non-prefix tokens",
                "layers_scored": [int(i) for i in np.nonzero(valid)[0]]}
