"""Model fingerprints: which model a plan or sensitivity file was computed for.

``weight_sha(t)`` is the SHA-256 of a tensor's values as float32, C-contiguous, in PyTorch layout
(``(out, in[, kh, kw])`` for Linear/Conv). Surgery uses the same hash (on the numpy array of an ONNX
initializer, transposed back to PyTorch layout where needed) to find layers in a graph, so it must not
depend on device, dtype of storage, strides or ``requires_grad``.

``fingerprint(model)`` is the SHA-256 over the sorted ``(name, shape, weight_sha)`` of every parameter
and buffer (integer buffers such as BatchNorm's ``num_batches_tracked`` included, hashed as float32).
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def weight_sha(t: torch.Tensor) -> str:
    """SHA-256 (hex) of ``t`` as float32 C-contiguous bytes, PyTorch layout."""
    a = t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    return hashlib.sha256(a.tobytes(order="C")).hexdigest()


def fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) over sorted ``(name, shape, weight_sha)`` of all parameters and buffers.

    Shared (tied) tensors count once per name, as ``named_parameters(remove_duplicate=False)`` lists them.
    """
    items: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        items[name] = p
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            items[name] = b
    h = hashlib.sha256()
    for name in sorted(items):
        t = items[name]
        h.update(f"{name}|{tuple(t.shape)}|{weight_sha(t)}\n".encode())
    return h.hexdigest()
