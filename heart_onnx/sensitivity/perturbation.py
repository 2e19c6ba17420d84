"""The hook-install/perturbation block shared by head and token sensitivities.

A perturbation context installs hooks on some modules; on the forward each hook creates ``delta``
(zeros that require grad) for one analysed layer, appends it to the shared ``params`` list (its index
in ``slots``) and records the component tensor ``z``. After the forward and one ``HVP``, ``_scores``
turns them into ``-g.z + 1/2 z^T H z`` per input and component (``probes.py``). Subclasses say where
the hooks go (``_install``) and how a tensor splits into components (``view``/``scale``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .hvp import HVP
from .probes import exact_scores, first_order, probe_scores


class Perturbation:
    """Base of ``HeadPerturbation``, ``TokenPerturbation`` and ``TokenGates`` (a context manager).

    ``layers`` (default None = every layer of ``adapter``); ``params`` the shared list the deltas are
    appended to (default: an own list). After one forward: ``slots`` and ``z`` (one entry per layer).
    """

    def __init__(self, adapter, layers: Sequence[int] | None = None, params: list | None = None):
        self.adapter = adapter
        self.layers = list(range(adapter.num_layers)) if layers is None else list(layers)
        self.params = [] if params is None else params
        self.slots: list[int] = []
        self.z: list[torch.Tensor] = []
        self._handles: list = []

    def _new_delta(self, like: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Zeros shaped like ``like`` (or ``shape``) that require grad, recorded in ``params``/``slots``."""
        d = torch.zeros_like(like, requires_grad=True) if shape is None else \
            torch.zeros(tuple(shape), dtype=like.dtype, device=like.device, requires_grad=True)
        self.slots.append(len(self.params))
        self.params.append(d)
        return d

    def _install(self, handles: list) -> None:
        """Register the hooks, appending each handle to ``handles`` as it is made."""
        raise NotImplementedError

    def _restore(self) -> None:
        """Undo anything besides the hooks (default: nothing)."""

    def __enter__(self):
        try:
            self._install(self._handles)
        except BaseException:
            self.__exit__(None, None, None)  # no hook outlives a failed install
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._restore()

    def _scores(self, op: HVP, n_probes: int, gen: torch.Generator, exact: bool = False, skip: int = 0) -> torch.Tensor:
        """``-g.z + 1/2 z^T H z`` per input, layer and component: (B, L, C) float64 on CPU; ``skip`` leading
        components get no second-order term (prefix tokens)."""
        if len(self.z) != len(self.layers):
            raise RuntimeError(f"run exactly one forward inside the {type(self).__name__} context before scoring")
        second = exact_scores(op, self.z, self.slots, self.view, self.scale, skip=skip) if exact else \
            probe_scores(op, self.z, self.slots, self.view, self.scale, n_probes, gen, skip=skip)
        return first_order(op, self.z, self.slots, self.view).double().cpu() + second
