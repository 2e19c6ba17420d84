"""Hessian-vector products and the estimators built on them (model-agnostic, imports only torch).

Every function takes ``loss_fn``, a zero-argument callable that returns a scalar loss computed from
``params`` (tensors with ``requires_grad=True``: model weights, or activation perturbations inserted
by hooks), and works in float32 and float64 on any device. Random probes are drawn on the CPU from a
``torch.Generator`` seeded with ``seed`` and then moved, so results are deterministic and the same on
every device.

    H v      = d/dp (g . v),  g = dL/dp   (double backward, one gradient graph reused for many v)
    diag(H) ~= E[v * Hv]     (Hutchinson, Rademacher v)
    tr(H)   ~= E[v . Hv]
    lambda_max by power iteration on v <- Hv / |Hv|
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Tensors = Sequence[torch.Tensor]
LossFn = Callable[[], torch.Tensor]


def _as_list(x: torch.Tensor | Tensors) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _dot(a: Tensors, b: Tensors) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def gradient(loss_fn: LossFn, params: Tensors, create_graph: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(loss, [dL/dp])``; with ``create_graph=True`` (default) the gradient can be differentiated again."""
    params = _as_list(params)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return loss, grads


class HVP:
    """Reusable HVP operator: one forward and one gradient graph, then ``self(v)`` = H v per call.

    ``loss``/``grads`` hold the loss and first gradient at the current point (g, used by first-order
    terms). Each call costs one backward through the gradient graph (about 2x a plain backward).
    """

    def __init__(self, loss_fn: LossFn, params: Tensors):
        # ``params`` is read after ``loss_fn()`` runs, so a list that the forward fills (activation
        # perturbations created by hooks) works as well as a fixed list of weights.
        loss = loss_fn()
        self.params = _as_list(params)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self.loss = loss
        self.grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        self._differentiable = [g.requires_grad for g in self.grads]

    def __call__(self, v: torch.Tensor | Tensors, retain_graph: bool = True) -> list[torch.Tensor]:
        v = _as_list(v)
        if len(v) != len(self.params):
            raise ValueError(f"v has {len(v)} tensors, params has {len(self.params)}")
        pairs = [(g, u) for g, u, d in zip(self.grads, v, self._differentiable) if d]
        if not pairs:
            return [torch.zeros_like(p) for p in self.params]
        gv = sum((g * u.to(g.dtype)).sum() for g, u in pairs)
        hv = torch.autograd.grad(gv, self.params, retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self.params, hv)]


def hvp(loss_fn: LossFn, params: torch.Tensor | Tensors, v: torch.Tensor | Tensors) -> list[torch.Tensor]:
    """H v by double backward, H the Hessian of ``loss_fn()`` w.r.t. ``params``; returns a list like ``params``."""
    return HVP(loss_fn, params)(v, retain_graph=False)


def hvp_func(f: Callable[..., torch.Tensor], primals: Tensors, tangents: Tensors) -> list[torch.Tensor]:
    """H v for a *functional* ``f(*primals) -> scalar`` via ``torch.func`` (forward-over-reverse).

    Cheaper than double backward where every op has a forward-mode rule; models with in-place ops,
    hooks or fused attention may not be supported by ``torch.func`` (then use :func:`hvp`).
    """
    from torch.func import grad, jvp

    primals = tuple(_as_list(primals))
    tangents = tuple(t.to(p.dtype) for p, t in zip(primals, _as_list(tangents)))
    argnums = tuple(range(len(primals)))
    _, out = jvp(grad(f, argnums=argnums), primals, tangents)
    return [o.detach() for o in out]


def rademacher_like(params: Tensors, generator: torch.Generator) -> list[torch.Tensor]:
    """Random +-1 tensors shaped like ``params`` (drawn on the CPU from ``generator``, then moved)."""
    out = []
    for p in params:
        r = torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8)
        out.append((r.to(p.dtype) * 2 - 1).to(p.device))
    return out


def hutchinson_diag(loss_fn: LossFn, params: torch.Tensor | Tensors, n_probes: int = 100, seed: int = 0) -> list[torch.Tensor]:
    """Hutchinson estimate of diag(H), ``mean_k v_k * H v_k`` (Rademacher v); defaults ``n_probes=100, seed=0``."""
    if n_probes < 1:
        raise ValueError("n_probes must be >= 1")
    op = HVP(loss_fn, params)
    gen = torch.Generator().manual_seed(int(seed))
    acc = [torch.zeros_like(p) for p in op.params]
    for k in range(n_probes):
        v = rademacher_like(op.params, gen)
        hv = op(v, retain_graph=k < n_probes - 1)
        for a, x, y in zip(acc, v, hv):
            a.add_(x * y)
    return [a / n_probes for a in acc]


def hutchinson_trace(loss_fn: LossFn, params: torch.Tensor | Tensors, n_probes: int = 100, seed: int = 0,
                     return_std: bool = False) -> float | tuple[float, float]:
    """Hutchinson estimate of tr(H), ``mean_k v_k . H v_k``; defaults ``n_probes=100, seed=0``.

    With ``return_std=True`` also the standard error of the mean over probes.
    """
    if n_probes < 1:
        raise ValueError("n_probes must be >= 1")
    op = HVP(loss_fn, params)
    gen = torch.Generator().manual_seed(int(seed))
    samples = []
    for k in range(n_probes):
        v = rademacher_like(op.params, gen)
        hv = op(v, retain_graph=k < n_probes - 1)
        samples.append(float(_dot(v, hv)))
    t = torch.tensor(samples, dtype=torch.float64)
    mean = float(t.mean())
    if return_std:
        std = float(t.std(unbiased=True) / n_probes ** 0.5) if n_probes > 1 else float("nan")
        return mean, std
    return mean


def power_iteration(loss_fn: LossFn, params: torch.Tensor | Tensors, iters: int = 100, tol: float = 1e-6,
                    seed: int = 0) -> tuple[float, list[torch.Tensor]]:
    """Dominant Hessian eigenpair (largest |eigenvalue|) by power iteration; defaults ``iters=100, tol=1e-6, seed=0``.

    Stops when the Rayleigh quotient changes by less than ``tol`` relative. Returns ``(eig, vec)`` with
    ``vec`` a unit-norm list shaped like ``params``. For a Gauss-Newton Hessian (KL loss at the dense
    point) every eigenvalue is >= 0, so this is the top eigenvalue.
    """
    op = HVP(loss_fn, params)
    gen = torch.Generator().manual_seed(int(seed))
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in op.params]
    norm = torch.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    eig = None
    for _ in range(max(1, iters)):
        hv = op(v)
        new_eig = float(_dot(v, hv))
        norm = torch.sqrt(_dot(hv, hv))
        if float(norm) == 0.0:
            return 0.0, v
        v = [x / norm for x in hv]
        if eig is not None and abs(new_eig - eig) <= tol * max(abs(eig), 1e-30):
            eig = new_eig
            break
        eig = new_eig
    return float(eig), v
