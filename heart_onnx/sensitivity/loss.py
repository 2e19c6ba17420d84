"""Calibration losses, per input: KL to the dense model (default, label-free), cross-entropy, MSE, cosine.

Every function returns a (B,) tensor, one loss per input (language models: mean over positions), so
that ``loss.sum()`` has a block-diagonal Hessian over the batch and one HVP yields per-input terms.

KL(dense || current) of the predictive distribution, with ``p`` the dense and ``q`` the current
softmax over logits ``z``: ``sum_v p_v log p_v - p.z + logsumexp(z)``. Passing no target uses the current
logits, detached, as the dense ones: exact at the dense point (all perturbations zero), where the loss is
0, its gradient 0 and its Hessian the Gauss-Newton matrix ``J^T (diag(q) - q q^T) J``.

Language models: logits (B, T, V) with V ~ 50k make naive double backward hold several (B, T, V)
copies. :func:`lm_kl_chunked` computes the KL from the final hidden states (B, T, D) and the LM head
weight (V, D) in row chunks inside a custom autograd function whose backward is itself a chunked
function, so the HVP never materialises more than ``chunk_rows x V`` logits at a time. One row's
logits (V floats) always fit, so the chunking is over (batch x sequence) rows; the vocabulary is
never split. The LM head weight gets no gradient through this path (it is treated as a constant).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("kl", "ce", "mse", "cosine")


def _per_input(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) -> (B,) mean over valid positions; (B,) unchanged."""
    if x.ndim == 1:
        return x
    if mask is None:
        return x.mean(dim=tuple(range(1, x.ndim)))
    m = mask.to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (losses in low precision lose the small differences that matter)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def kl_loss(logits: torch.Tensor, target_logits: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-input KL(softmax(target) || softmax(logits)), (B, C) or (B, T, V) logits -> (B,).

    ``target_logits`` default None: the logits themselves, detached (the dense point). ``mask`` (B, T)
    selects the positions of language-model inputs (default: all).
    """
    z = _upcast(logits)
    t = z.detach() if target_logits is None else target_logits.to(z.dtype)
    logp = F.log_softmax(t, dim=-1)
    p = logp.exp()
    kl = (p * logp).sum(-1) - (p * z).sum(-1) + torch.logsumexp(z, dim=-1)  # (B,) or (B, T)
    return _per_input(kl, mask)


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-input cross-entropy. Classifiers: logits (B, C), labels (B,). LMs: logits (B, T, V) and
    labels (B, T) are next-token targets (position t predicts ``labels[:, t+1]``)."""
    logits = _upcast(logits)
    if logits.ndim == 2:
        return F.cross_entropy(logits, labels.long(), reduction="none")
    z = logits[:, :-1]  # (B, T-1, V)
    y = labels[:, 1:].long()
    ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)
    return _per_input(ce, None if mask is None else mask[:, 1:])


def mse_loss(output: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-input mean squared error against the dense output (default: the output detached, i.e. 0)."""
    t = output.detach() if target is None else target
    d = _upcast(output - t) ** 2
    return d.reshape(d.shape[0], -1).mean(1)


def cosine_loss(output: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-input ``1 - cos(output, target)`` over the flattened features (default target: output detached)."""
    t = output.detach() if target is None else target
    o, t = _upcast(output.reshape(output.shape[0], -1)), _upcast(t.reshape(t.shape[0], -1))
    return 1 - F.cosine_similarity(o, t, dim=1)


def per_input_loss(name: str, output: torch.Tensor, target: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch on ``name`` in ``LOSSES``; ``target`` is the dense output (None = dense point)."""
    if name == "kl":
        return kl_loss(output, target, mask)
    if name == "ce":
        if labels is None:
            raise ValueError("loss='ce' needs labels: give (inputs, labels) batches or use loss='kl'")
        return ce_loss(output, labels, mask)
    if name == "mse":
        return mse_loss(output, target)
    if name == "cosine":
        return cosine_loss(output, target)
    raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")


# --------------------------------------------------------------------------- chunked LM KL
def _rows(n: int, chunk: int) -> Iterator[slice]:
    for i in range(0, n, chunk):
        yield slice(i, min(n, i + chunk))


def _probs(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    z = F.linear(h, W, b)  # (c, V)
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    logq = F.log_softmax(z, dim=-1)
    return z, logq


class _KLGrad(torch.autograd.Function):
    """grad_h of the chunked KL: ``wr * (q - p) @ W`` per row; its backward is the Gauss-Newton/Hessian product."""

    @staticmethod
    def forward(ctx, h, ht, W, b, wr, chunk):  # h, ht (R, D); wr (R,)
        ctx.save_for_backward(h, ht, W, wr)
        ctx.b, ctx.chunk = b, chunk
        out = torch.empty_like(h)
        for s in _rows(h.shape[0], chunk):
            _, logq = _probs(h[s], W, b)
            logp = logq if ht is None or ht.numel() == 0 else _probs(ht[s], W, b)[1]
            r = (logq.exp() - logp.exp()) * wr[s, None]  # (c, V)
            out[s] = (r.to(W.dtype) @ W).to(h.dtype)
        return out

    @staticmethod
    def backward(ctx, u):  # u (R, D): d/dh [u . grad_h] = wr * ((diag(q) - q q^T) (u W^T)) W
        h, ht, W, wr = ctx.saved_tensors
        gh = torch.empty_like(h)
        for s in _rows(h.shape[0], ctx.chunk):
            _, logq = _probs(h[s], W, ctx.b)
            q = logq.exp()  # (c, V)
            a = F.linear(u[s].to(W.dtype), W).to(q.dtype)  # (c, V)
            r = q * a - q * (q * a).sum(-1, keepdim=True)
            gh[s] = ((r * wr[s, None]).to(W.dtype) @ W).to(h.dtype)
        return gh, None, None, None, None, None


class _ChunkedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, ht, W, b, wr, chunk):
        ctx.save_for_backward(h, ht, W, wr)
        ctx.b, ctx.chunk = b, chunk
        total = h.new_zeros((), dtype=torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype)
        for s in _rows(h.shape[0], chunk):
            z, logq = _probs(h[s], W, b)
            if ht is None or ht.numel() == 0:
                continue  # dense point: KL = 0 exactly
            logp = _probs(ht[s], W, b)[1]
            total += ((logp.exp() * (logp - logq)).sum(-1) * wr[s]).sum()
        return total

    @staticmethod
    def backward(ctx, go):
        h, ht, W, wr = ctx.saved_tensors
        gh = _KLGrad.apply(h, ht, W, ctx.b, wr * go, ctx.chunk)
        return gh, None, None, None, None, None


def lm_kl_chunked(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  target_hidden: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                  chunk_rows: int | None = None) -> torch.Tensor:
    """Sum over the batch of per-input KL (mean over positions) from final hidden states, chunked.

    ``hidden`` (B, T, D) feeds the LM head ``weight`` (V, D) (+ ``bias``). ``target_hidden`` default
    None: the dense point (loss 0; gradient 0; the Hessian is Gauss-Newton). ``mask`` (B, T) default
    all positions. ``chunk_rows`` default: rows such that one chunk's logits take ~32 MB. Twice
    differentiable w.r.t. ``hidden`` (HVPs), with at most ~3 chunks of logits alive at a time.
    """
    B, T, D = hidden.shape
    V = weight.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1, (32 << 20) // (4 * V))
    wdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    m = torch.ones(B, T, device=hidden.device, dtype=wdt) if mask is None else mask.to(hidden.device, wdt)
    wr = (m / m.sum(1, keepdim=True).clamp_min(1)).reshape(-1)  # (B*T,) per-input mean weights
    ht = hidden.new_zeros(0) if target_hidden is None else target_hidden.detach().reshape(B * T, D)
    return _ChunkedKL.apply(hidden.reshape(B * T, D), ht, weight.detach(), None if bias is None else bias.detach(),
                            wr, int(chunk_rows))


def output_head(model: nn.Module) -> nn.Linear | None:
    """The LM head ``nn.Linear`` of a Hugging Face causal LM (``get_output_embeddings()``), else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


@contextlib.contextmanager
def capture_lm_head(model: nn.Module) -> Iterator[dict]:
    """While active, the LM head records its input hidden states in ``box["hidden"]`` (B, T, D) and
    returns a (B, T, 1) zero placeholder instead of the (B, T, V) logits (which are never computed)."""
    head = output_head(model)
    if head is None:
        raise ValueError("model has no nn.Linear output embedding (get_output_embeddings())")
    box: dict = {"weight": head.weight, "bias": head.bias}

    def fwd(x: torch.Tensor) -> torch.Tensor:
        box["hidden"] = x
        return x[..., :1] * 0

    head.forward = fwd  # instance attribute shadows the class method
    try:
        yield box
    finally:
        del head.forward
