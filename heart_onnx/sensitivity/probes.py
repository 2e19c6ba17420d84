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
