"""Attention-head sensitivities (HEART-ViT): perturb each head's output where it enters the output projection.

``HeadPerturbation`` installs, for every analysed layer ``l``, a forward pre-hook on
``adapter.head_input_module(l)`` whose input (B, N, H*Dh) is the concatenation of the head outputs.
The hook adds ``delta_l``, zeros that require grad (created on the forward), and records the dense
input ``z_l``. Removing head ``h`` of layer ``l`` is ``delta_l[..., h*Dh:(h+1)*Dh] = -z_l[..., h*Dh:(h+1)*Dh]``
over all tokens: exactly what the masked reference does (the head's columns zeroed before the
projection). Its score is ``-g.z_h + 1/2 z_h^T H z_h`` (see ``probes.py``).
"""
from __future__ import annotations

import torch
from torch import nn

from .hvp import HVP
from .perturbation import Perturbation


class HeadPerturbation(Perturbation):
    """Context manager: pre-hooks adding ``delta_l`` to the head-concat input of each layer in ``layers``.

    After a forward: ``deltas`` (list, one (B, N, H*Dh) tensor per layer, requires grad) and ``z`` (the
    dense inputs, detached). ``params`` is the shared list the deltas are appended to (default: own list).
    """

    def _hook(self, j: int):
        def pre(_mod: nn.Module, args: tuple):
            x = args[0]  # (B, N, H*Dh)
            d = self._new_delta(x)
            self.z.append(x.detach())
            return (x + d,) + tuple(args[1:])
        return pre

    def _install(self, handles: list) -> None:
        handles.extend(self.adapter.head_input_module(l).register_forward_pre_hook(self._hook(j))
                       for j, l in enumerate(self.layers))

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, H*Dh) -> (B, H, N*Dh): elements grouped by head."""
        B, N, F = t.shape
        H = self.adapter.num_heads
        return t.reshape(B, N, H, F // H).transpose(1, 2).reshape(B, H, -1)

    def scale(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """(B, N, H*Dh) with head ``h`` of input ``b`` multiplied by ``s[b, h]`` (s: (B, H))."""
        B, N, F = t.shape
        H = self.adapter.num_heads
        return (t.reshape(B, N, H, F // H) * s[:, None, :, None]).reshape(B, N, F)

    def scores(self, op: HVP, n_probes: int, gen: torch.Generator, exact: bool = False) -> torch.Tensor:
        """Per-input predicted loss increase of removing each head: (B, L, H) float64 on CPU."""
        return self._scores(op, n_probes, gen, exact)
