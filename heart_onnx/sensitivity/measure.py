"""Measured (not predicted) loss changes: remove heads or drop tokens for real and evaluate the loss.

The ground truth the second-order scores are validated against (tests and benchmarks):

- ``remove_heads(adapter, {l: [h, ...]})``: zero the heads' columns of the head-concat input (what the
  masked reference and head surgery do);
- ``drop_tokens(adapter, layer, keep_idx)``: after block ``layer`` keep only tokens ``keep_idx`` (B, K)
  (prefix included, in the given order): later blocks never see the others (the token rule).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from .tokens import _out


@contextlib.contextmanager
def remove_heads(adapter, heads: Mapping[int, Sequence[int]]) -> Iterator[None]:
    """Zero the given heads (``{layer: [head, ...]}``) while active."""
    Dh = adapter.head_dim
    handles = []
    for l, hs in heads.items():
        if not len(hs):
            continue
        mask = torch.ones(adapter.num_heads * Dh)
        for h in hs:
            mask[h * Dh:(h + 1) * Dh] = 0

        def pre(_m, args, mask=mask):
            x = args[0]  # (B, N, H*Dh)
            return (x * mask.to(x.device, x.dtype),) + tuple(args[1:])
        handles.append(adapter.head_input_module(l).register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def drop_tokens(adapter, layer: int, keep_idx: torch.Tensor) -> Iterator[None]:
    """After block ``layer`` keep only tokens ``keep_idx`` (B, K) (int64) while active."""
    def post(_m, _args, out):
        x = _out(out)  # (B, N, D)
        idx = keep_idx.to(x.device)[:, :, None].expand(-1, -1, x.shape[-1])
        y = torch.gather(x, 1, idx)  # (B, K, D)
        return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
    h = adapter.block_module(layer).register_forward_hook(post)
    try:
        yield
    finally:
        h.remove()


def _loss(objective, inputs, labels, dense):
    from .loss import per_input_loss

    out = objective.adapter.forward(inputs)
    return per_input_loss(objective.name, out, dense, labels).double().cpu()


@torch.no_grad()
def single_head_losses(adapter, inputs, labels=None, loss: str = "kl") -> np.ndarray:
    """Measured per-input loss increase of removing each head alone: (B, L, H)."""
    from .api import Objective

    obj = Objective(adapter, loss, chunked=False)
    dense = adapter.forward(inputs)
    base = _loss(obj, inputs, labels, dense)
    L, H = adapter.num_layers, adapter.num_heads
    out = np.zeros((base.shape[0], L, H))
    for l in range(L):
        for h in range(H):
            with remove_heads(adapter, {l: [h]}):
                out[:, l, h] = (_loss(obj, inputs, labels, dense) - base).numpy()
    return out


@torch.no_grad()
def token_drop_losses(adapter, inputs, layer: int, drop: torch.Tensor, labels=None, loss: str = "kl") -> np.ndarray:
    """Measured per-input loss increase of dropping tokens ``drop`` (B, M) after block ``layer``: (B,)."""
    from .api import Objective

    obj = Objective(adapter, loss, chunked=False)
    dense = adapter.forward(inputs)
    base = _loss(obj, inputs, labels, dense)
    B, N = drop.shape[0], adapter.seq_len
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[torch.arange(B)[:, None], drop.cpu()] = False
    keep_idx = torch.stack([torch.nonzero(k).flatten() for k in keep])  # (B, N-M), original order
    with drop_tokens(adapter, layer, keep_idx):
        after = _loss(obj, inputs, labels, dense)
    return (after - base).numpy()
