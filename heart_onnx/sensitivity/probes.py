"""Second-order scores of many components at once with random-sign probes (model-agnostic, torch only).

A *component* is a slice of a perturbed activation ``z`` (one head's columns, one token's row).
Removing component ``c`` sets ``delta = -z_c``, so the loss changes by about

    dL_c ~= -g . z_c + 1/2 z_c^T H z_c        (g, H: gradient and Hessian w.r.t. the perturbation)

Probe estimate of the diagonal blocks: with ``v = sum_c s_c z_c`` and independent random signs
``s_c = +-1``, ``E[s_c z_c . (H v)_c] = z_c^T H_cc z_c`` (cross terms vanish since E[s_c s_d] = 0),
so ONE HVP per probe scores every component of every layer. The loss is a sum of per-input losses,
so H is block-diagonal over the batch and the same HVP yields per-input scores (signs are drawn per
input). ``exact_scores`` does one HVP per component instead (the reference the probes are checked against).

Activations are given through two functions: ``view(t)`` -> (B, C, E) (batch, component, elements of
the component; used for dot products) and ``scale(t, s)``: ``t`` with component ``c`` of input ``b``
multiplied by ``s[b, c]`` (used to build probe vectors in the activation's own layout).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .hvp import HVP

# (z (B, ...), layer index) -> (B, C, E) view of z grouping elements by component
View = Callable[[torch.Tensor], torch.Tensor]
Scale = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def first_order(op: HVP, zs: Sequence[torch.Tensor], slots: Sequence[int], view: View) -> torch.Tensor:
    """``-g . z_c`` per input and component: (B, len(zs), C)."""
    out = [-(view(op.grads[i].detach()) * view(z)).sum(-1) for i, z in zip(slots, zs)]
    return torch.stack(out, 1)


def probe_scores(op: HVP, zs: Sequence[torch.Tensor], slots: Sequence[int], view: View, scale: Scale, n_probes: int,
                 gen: torch.Generator, skip: int = 0) -> torch.Tensor:
    """Estimate ``1/2 z_c^T H_cc z_c`` for all components: (B, L, C), averaged over ``n_probes``.

    ``zs[j]`` is the dense activation at parameter slot ``slots[j]`` of ``op``; components ``< skip``
    (prefix tokens) get no probe and score 0. Signs come from ``gen`` (CPU).
    """
    B = zs[0].shape[0]
    C = view(zs[0]).shape[1]
    acc = torch.zeros(B, len(zs), C, dtype=torch.float64)
    for _ in range(n_probes):
        signs = torch.randint(0, 2, (B, len(zs), C), generator=gen).to(torch.float64) * 2 - 1  # (B, L, C)
        signs[:, :, :skip] = 0
        v = [torch.zeros_like(p) for p in op.params]
        for j, (i, z) in enumerate(zip(slots, zs)):
            s = signs[:, j].to(device=z.device, dtype=z.dtype)
            v[i] = scale(z, s)
        hv = op(v)
        for j, (i, z) in enumerate(zip(slots, zs)):
            s = signs[:, j]
            acc[:, j] += s * (view(z) * view(hv[i])).sum(-1).double().cpu()
    return 0.5 * acc / n_probes


def exact_scores(op: HVP, zs: Sequence[torch.Tensor], slots: Sequence[int], view: View, scale: Scale,
                 skip: int = 0) -> torch.Tensor:
    """``1/2 z_c^T H_cc z_c`` with one HVP per (layer, component): (B, L, C)."""
    B = zs[0].shape[0]
    C = view(zs[0]).shape[1]
    out = torch.zeros(B, len(zs), C, dtype=torch.float64)
    for j, (i, z) in enumerate(zip(slots, zs)):
        for c in range(skip, C):
            v = [torch.zeros_like(p) for p in op.params]
            onehot = torch.zeros(B, C, dtype=z.dtype, device=z.device)
            onehot[:, c] = 1
            v[i] = scale(z, onehot)
            hv = op(v)
            out[:, j, c] = 0.5 * (view(z)[:, c] * view(hv[i])[:, c]).sum(-1).double().cpu()
    return out


# --------------------------------------------------------------------------- output-space (GGN) estimator
def ggn_scores(logits: torch.Tensor, params: Sequence[torch.Tensor], perts: Sequence, n_samples: int,
               gen: torch.Generator, mask: torch.Tensor | None = None, max_classes: int = 64,
               keep_dots: Sequence = ()) -> list[torch.Tensor]:
    """``1/2 z_c^T G z_c`` for the KL loss at the dense point, from output-space gradients (no double backward).

    At the dense point the KL Hessian is the Gauss-Newton matrix ``G = J^T (diag(p) - p p^T) J`` and, since
    ``sum_y p_y grad log p_y = 0``, ``z^T G z = E_{y ~ p}[(grad log p_y . z)^2]``: one backward per output
    class y scores every component of every layer. Classifiers with at most ``max_classes`` (default 64)
    classes enumerate y exactly (weight ``p_y``); otherwise ``n_samples`` labels are drawn from ``p`` (seeded
    by ``gen``): an unbiased, never negative estimate. Language models (logits (B, T, V)) draw one label per
    position per sample and weight positions by ``mask`` / count (the per-input mean over positions);
    cross-position terms vanish in expectation.

    ``perts``: perturbation objects with ``slots``, ``z``, ``view``. Returns one (B, L, C) float64 CPU tensor each.
    For each pert in ``keep_dots`` the per-draw products are stored on it as ``pert.ggn_dots`` (D, B, L, C)
    and ``pert.ggn_weights`` (D, B), so group quadratics ``1/2 sum_d w_d (sum_{c in S} dots_dc)^2`` (all
    cross terms included) can be formed later (``tokens.group_curve_sums``).
    """
    logp = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
    B = logp.shape[0]
    out = [torch.zeros(B, len(p.z), p.view(p.z[0]).shape[1], dtype=torch.float64) for p in perts]
    p = logp.detach().exp()
    if logp.ndim == 2 and logp.shape[-1] <= max_classes:
        draws = [(torch.full((B,), y, dtype=torch.long), p[:, y].double().cpu()) for y in range(logp.shape[-1])]
    else:
        draws = []
        for _ in range(n_samples):
            flat = p.double().cpu().reshape(-1, p.shape[-1])
            y = torch.multinomial(flat, 1, generator=gen).reshape(p.shape[:-1])
            draws.append((y, torch.full((B,), 1.0 / n_samples, dtype=torch.float64)))
    if logp.ndim == 3:
        m = torch.ones(logp.shape[:2], dtype=logp.dtype, device=logp.device) if mask is None else mask.to(logp)
        w = (m / m.sum(1, keepdim=True).clamp_min(1)).sqrt()  # (B, T)
    dots: dict[int, list] = {id(p_): [] for p_ in keep_dots}
    for k, (y, weight) in enumerate(draws):
        y = y.to(logp.device)
        if logp.ndim == 2:
            obj = logp.gather(-1, y[:, None]).sum()
        else:
            obj = (logp.gather(-1, y[..., None])[..., 0] * w).sum()
        grads = torch.autograd.grad(obj, list(params), retain_graph=k < len(draws) - 1, allow_unused=True)
        for acc, pert in zip(out, perts):
            rows = []
            for j, (i, z) in enumerate(zip(pert.slots, pert.z)):
                g = grads[i]
                gz = torch.zeros(acc.shape[0], acc.shape[2], dtype=torch.float64) if g is None else \
                    (pert.view(g) * pert.view(z)).sum(-1).double().cpu()  # (B, C)
                acc[:, j] += 0.5 * weight[:, None] * gz ** 2
                rows.append(gz)
            if id(pert) in dots:
                dots[id(pert)].append(torch.stack(rows, 1))  # (B, L, C)
    for pert in keep_dots:
        pert.ggn_dots = torch.stack(dots[id(pert)], 0).numpy()  # (D, B, L, C)
        pert.ggn_weights = torch.stack([w for _, w in draws], 0).numpy()  # (D, B)
    return out
