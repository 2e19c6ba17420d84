"""Token sensitivities: the predicted loss of dropping each token after each block.

What removing a token means. The token rule (``heart_onnx/plan.py``) drops token ``t`` after block
``l``: blocks ``l+1..`` never see it. Its only path to the output (class-token pooling) is as a *key/value*
in later attention: every later query attends over the remaining tokens, renormalised. So dropping is
exactly a per-token gate ``G_t`` on the attention probabilities of every later block,

    A'[i, j] = A[i, j] G_j / sum_j' A[i, j'] G_j'       (G_t = 1 dense, G_t = 0 dropped),

and ``TokenGates`` (the default, ``mode="gate"``) perturbs ``G = 1 + delta`` per stage ``l`` (one (B, N)
gate per block output, applied in all later blocks). Removal is ``delta_t = -1``, so the component is
``z_t = 1`` and the score is ``-g_t + 1/2 H_tt`` from the same random-sign probes as heads. The gate is
exact at ``delta = -1`` (it IS the dropped model), so only the second-order truncation errs.

The HEART-ViT form (``TokenPerturbation``, ``mode="hidden"``) instead perturbs the hidden state leaving
block ``l`` by ``delta = -x_t`` (erasing the token's content). In pre-LayerNorm transformers (every ViT)
that direction is radial for the next block's LayerNorm, ``LN((1-e) x) = LN(x)``, so the loss is flat
along it until the token hits exactly zero: the second-order estimate misses the attention path and sees
only the token's own residual stream (0 after the last block). It is kept for models whose attention
probabilities cannot be gated, and as the baseline the gate is compared against in
``benchmarks/sensitivity_quality.py``, which validates both against the MEASURED loss of dropping
tokens (``measure.drop_tokens``). Prefix tokens (class/distillation) are never scored (nan).

``keep_curve_sums`` turns per-input token scores into the curve the planner needs: for each layer and
keep count K, the summed scores of the ``N-K`` tokens a run-time scorer drops.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .hvp import HVP
from .perturbation import Perturbation


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


class TokenPerturbation(Perturbation):
    """Context manager: forward hooks adding ``delta_l`` (B, N, D) to each block output in ``layers``.

    After a forward: ``deltas`` in ``params`` (at ``slots``) and ``z`` (dense hidden states, detached).
    """

    def __init__(self, adapter, layers: Sequence[int] | None = None, params: list | None = None):
        super().__init__(adapter, layers, params)
        self.prefix = int(adapter.prefix_tokens or 0)

    @property
    def hidden(self) -> list[torch.Tensor]:
        """The dense block outputs (B, N, D) (the perturbed activations themselves)."""
        return self.z

    def _hook(self, j: int):
        def post(_mod: nn.Module, _args: tuple, out):
            x = _out(out)  # (B, N, D)
            d = self._new_delta(x)
            self.z.append(x.detach())
            y = x + d
            if isinstance(out, tuple):
                return (y,) + tuple(out[1:])
            if isinstance(out, list):
                return [y] + list(out[1:])
            return y
        return post

    def _install(self, handles: list) -> None:
        handles.extend(self.adapter.block_module(l).register_forward_hook(self._hook(j)) for j, l in enumerate(self.layers))

    @staticmethod
    def view(t: torch.Tensor) -> torch.Tensor:
        """(B, N, D) is already (B, components=N, elements=D)."""
        return t

    @staticmethod
    def scale(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """(B, N, D) with token ``n`` of input ``b`` multiplied by ``s[b, n]``."""
        return t * s[:, :, None]

    def scores(self, op: HVP, n_probes: int, gen: torch.Generator, exact: bool = False) -> torch.Tensor:
        """Per-input predicted loss increase of dropping each token: (B, L, N) float64 on CPU, prefix = nan."""
        P = self.prefix
        s = self._scores(op, n_probes, gen, exact, skip=P)
        s[:, :, :P] = float("nan")
        return s


def probs_module(adapter, layer: int) -> nn.Module | None:
    """The module whose forward input is block ``layer``'s attention probabilities (B, H, N, N), or None.

    Uses ``adapter.attention_probs_module(layer)`` when the adapter defines it, else recognises timm's
    ``Attention`` (non-fused path: the probabilities enter ``attn.attn_drop``).
    """
    get = getattr(adapter, "attention_probs_module", None)
    if callable(get):
        return get(layer)
    blocks = getattr(adapter.model, "blocks", None)
    attn = getattr(blocks[layer], "attn", None) if blocks is not None and layer < len(blocks) else None
    if attn is not None and isinstance(getattr(attn, "attn_drop", None), nn.Module) and hasattr(attn, "fused_attn"):
        return attn.attn_drop
    return None


def gates_supported(adapter) -> bool:
    return all(probs_module(adapter, l) is not None for l in range(adapter.num_layers))


class TokenGates(Perturbation):
    """Context manager: a gate ``1 + delta_l`` (B, N) per stage ``l`` on the attention keys of blocks ``> l``.

    After a forward: gate perturbations in ``params`` (at ``slots``), ``z`` = ones (the component of
    removal, delta = -1) and ``hidden`` (the dense block outputs (B, N, D), for the linear scorer).
    """

    def __init__(self, adapter, layers: Sequence[int] | None = None, params: list | None = None):
        super().__init__(adapter, layers, params)
        self.hidden: list[torch.Tensor] = []
        self.prefix = int(adapter.prefix_tokens or 0)
        self._gates: dict[int, torch.Tensor] = {}
        self._fused: list = []

    def _post(self, l: int):
        def post(_mod: nn.Module, _args: tuple, out):
            x = _out(out)  # (B, N, D)
            d = self._new_delta(x, x.shape[:2])  # (B, N)
            self.z.append(torch.ones_like(d).detach())
            self.hidden.append(x.detach())
            self._gates[l] = d
        return post

    def _pre(self, k: int):
        def pre(_mod: nn.Module, args: tuple):
            ds = [d for l, d in self._gates.items() if l < k]
            if not ds:
                return None
            A = args[0]  # (B, H, N, N) probabilities, keys last
            G = torch.stack(ds, 0).add(1).prod(0)  # (B, N)
            A = A * G[:, None, None, :]
            return (A / A.sum(-1, keepdim=True),) + tuple(args[1:])
        return pre

    def _install(self, handles: list) -> None:
        for l in self.layers:
            handles.append(self.adapter.block_module(l).register_forward_hook(self._post(l)))
        for k in range(self.adapter.num_layers):
            mod = probs_module(self.adapter, k)
            if mod is None:
                raise RuntimeError(f"block {k} exposes no attention probabilities to gate: use mode='hidden'")
            attn = getattr(self.adapter.model.blocks[k], "attn", None) if hasattr(self.adapter.model, "blocks") else None
            if attn is not None and getattr(attn, "fused_attn", False):
                self._fused.append(attn)
                attn.fused_attn = False
            handles.append(mod.register_forward_pre_hook(self._pre(k)))

    def _restore(self) -> None:
        for attn in self._fused:
            attn.fused_attn = True
        self._fused.clear()
        self._gates.clear()

    @staticmethod
    def view(t: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, N, 1): one scalar gate per token."""
        return t[..., None]

    @staticmethod
    def scale(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return t * s

    def scores(self, op: HVP, n_probes: int, gen: torch.Generator, exact: bool = False) -> torch.Tensor:
        """Per-input predicted loss increase of dropping each token: (B, L, N) float64 on CPU, prefix = nan."""
        return TokenPerturbation.scores(self, op, n_probes, gen, exact)


def drop_order(scorer_scores: np.ndarray, prefix: int) -> np.ndarray:
    """Indices of non-prefix tokens in the order a TopK scorer drops them (lowest score first).

    ``scorer_scores`` (..., N) -> (..., N-P) absolute token indices. Ties: stable (lower index dropped first).
    """
    s = np.asarray(scorer_scores)[..., prefix:]
    return np.argsort(s, axis=-1, kind="stable") + prefix


def keep_curve_sums(token_scores: np.ndarray, scorer_scores: np.ndarray, prefix: int) -> np.ndarray:
    """Sum over inputs of the predicted loss of keeping K tokens: (L, N+1) (``K < prefix`` = nan).

    ``token_scores`` (B, L, N) Hessian per-token scores; ``scorer_scores`` (B, L, N) run-time scorer
    values (higher = kept). Entry ``[l, K]``: sum over inputs of the scores of the ``N-K`` dropped tokens.
    """
    B, L, N = token_scores.shape
    order = drop_order(scorer_scores, prefix)  # (B, L, N-P)
    dropped = np.take_along_axis(np.nan_to_num(token_scores), order, axis=-1)  # (B, L, N-P), dropped first
    cum = np.concatenate([np.zeros((B, L, 1)), np.cumsum(dropped, axis=-1)], axis=-1)  # (B, L, N-P+1): drop 0..N-P
    out = np.full((L, N + 1), np.nan)
    # keep K = N - n_dropped
    out[:, prefix:] = cum.sum(0)[:, ::-1]
    return out


def group_curve_sums(dots: np.ndarray, weights: np.ndarray, scorer_scores: np.ndarray, prefix: int) -> np.ndarray:
    """Like :func:`keep_curve_sums` but with every cross term inside a stage: (L, N+1).

    ``dots`` (D, B, L, N) and ``weights`` (D, B) from ``probes.ggn_scores``: the second-order loss of dropping
    a set S of tokens of one stage is ``1/2 sum_d w_d (sum_{t in S} dots_dt)^2`` (the Gauss-Newton quadratic
    of the whole group), which the sum of single-token scores underestimates when drops interact.
    """
    D_, B, L, N = dots.shape
    order = drop_order(scorer_scores, prefix)  # (B, L, N-P)
    d = np.take_along_axis(dots, np.broadcast_to(order, (D_,) + order.shape), axis=-1)  # (D, B, L, N-P)
    cum = np.concatenate([np.zeros((D_, B, L, 1)), np.cumsum(d, axis=-1)], axis=-1)  # (D, B, L, N-P+1)
    quad = 0.5 * (weights[:, :, None, None] * cum ** 2).sum(0)  # (B, L, N-P+1): drop 0..N-P
    out = np.full((L, N + 1), np.nan)
    out[:, prefix:] = quad.sum(0)[:, ::-1]
    return out
