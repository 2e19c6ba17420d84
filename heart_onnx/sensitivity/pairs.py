"""Weight sensitivities for CAMP-HiVe pair merging (arXiv 2511.06265): per-weight Hessian diagonal,
per-layer curvature and input Gram matrices, stored per weight name for ``Sensitivities.pairs``.

For every prunable weight ``W`` the adapter lists (``adapter.weights()``; key ``"<module>.weight"``):

- ``hdiag``: Hutchinson estimate ``E[v * H v]`` of the Hessian diagonal of the calibration loss w.r.t.
  the weights (all weights at once; ``probes`` Rademacher probes per batch, averaged over batches
  weighted by batch size, so it is the Hessian of the *mean* loss);
- ``curvature``: the top eigenvalue of the layer's own Hessian block, by power iteration on the first
  calibration batch (``power_iters``, 0 to skip: then no clipping);
- ``gram``: ``E[x x^T]`` of the layer's input along the reduction axis (Linear: the input features over
  every token; Conv: the unfolded ``in*kh*kw`` patches over every position) when that axis has at most
  ``max_gram`` entries and the layer is not a grouped (depthwise) conv; it gives the merge coefficient and the off-diagonal curvature (see
  ``heart_onnx.pairing``);
- for each ``adapter.channel_pairs()`` producer: the consumer's weight, ``consumer_hdiag``,
  ``consumer_curvature`` and ``consumer_gram`` (``E[a a^T]`` over the consumer's input *channels*).

Loss (``heart_onnx.sensitivity.loss``, mean over the batch): label-free ``"kl"`` (default):
``KL(p_dense || p)`` of the predictive distribution (tokens averaged for language models); at the dense
point its gradient is zero and its Hessian is the Gauss-Newton matrix (PSD). ``"ce"``: labelled
cross-entropy (batches ``(x, y)``); ``"mse"``/``"cosine"`` for embedding outputs.

``Sensitivities.pairs`` is flat (``name -> array``): store entries with ``heart_onnx.pairing.pack`` (keys
``"<weight name>/<field>"``) and read them back with ``heart_onnx.pairing.entries``.
Batches: a tensor ``x``, a tuple/list ``(x, y)`` or ``(x,)``, or a dict of model inputs (LMs).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HeartError
from ..models.base import ChannelPair, ModelAdapter
from ..models.fingerprint import weight_sha
from .hvp import hutchinson_diag, power_iteration
from .loss import LOSSES, per_input_loss

PairsEntry = dict[str, np.ndarray]


def param_name(module_name: str) -> str:
    """Adapter weight name (module path) -> parameter name, ``"blocks.0.mlp.fc1" -> "blocks.0.mlp.fc1.weight"``."""
    return module_name if module_name.endswith(".weight") else module_name + ".weight"


def _split(batch: Any) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping) and "labels" in batch:
        b = dict(batch)
        return b, b.pop("labels")
    return batch, None


def _batch_size(x: Any) -> int:
    if isinstance(x, Mapping):
        x = next(iter(x.values()))
    return int(x.shape[0])


def _mask(x: Any) -> torch.Tensor | None:
    return x.get("attention_mask") if isinstance(x, Mapping) else None


def calibration_loss(logits: torch.Tensor, dense: torch.Tensor | None, labels: torch.Tensor | None,
                     loss: str = "kl", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of ``heart_onnx.sensitivity.loss.per_input_loss`` (kl, ce, mse, cosine)."""
    if loss not in LOSSES:
        raise HeartError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
    if loss == "ce" and labels is None:
        raise HeartError("loss 'ce' needs labelled calibration data (batches (x, y)): use loss='kl' for unlabelled data")
    return per_input_loss(loss, logits, dense, labels, mask).mean()


class _GramHook:
    """Accumulates ``sum x x^T`` of a module's input (reduction axis or channels) in float64."""

    def __init__(self, module: nn.Module, mode: str):
        self.module, self.mode = module, mode  # mode: "reduction" | "channel"
        self.sum: torch.Tensor | None = None
        self.n = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        x = inp[0].detach()
        if isinstance(mod, nn.Conv2d):
            if self.mode == "reduction":
                cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (B, in*kh*kw, L)
                if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
                    raise HeartError(f"{mod} uses padding {mod.padding!r}/{mod.padding_mode}: gram statistics support zero padding only")
                rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B*L, R)
            else:
                rows = x.transpose(0, 1).reshape(x.shape[1], -1).t()  # (B*H*W, C)
        else:
            rows = x.reshape(-1, x.shape[-1])  # (B*N, in)
        rows = rows.double()
        g = rows.t() @ rows
        self.sum = g if self.sum is None else self.sum + g
        self.n += rows.shape[0]

    def value(self) -> np.ndarray | None:
        return None if self.sum is None else (self.sum / max(self.n, 1)).float().cpu().numpy()


@contextlib.contextmanager
def _math_attention() -> Any:
    """Fused attention has no double backward on CPU: force the math SDPA kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _reduction_size(mod: nn.Module) -> int:
    w = mod.weight
    return int(np.prod(w.shape[1:]))


def weight_sensitivities(model: nn.Module | ModelAdapter, calib: Iterable[Any], *, weights: Sequence[str] | None = None,
                         loss: str = "kl", probes: int = 16, power_iters: int = 20, seed: int = 0,
                         max_gram: int = 4096, channel: bool = True, max_batches: int | None = None) -> dict[str, PairsEntry]:
    """Per-weight sensitivities for pair merging (module docstring); returns ``{param name: entry}``.

    ``weights``: adapter weight names to analyse (default ``None``: all of ``adapter.weights()``);
    ``loss="kl"`` (label-free, default) or ``"ce"``; ``probes=16`` Hutchinson probes per batch;
    ``power_iters=20`` power-iteration steps per layer (0: no curvature); ``seed=0``; ``max_gram=4096``
    largest reduction axis whose Gram matrix is stored; ``channel=True`` adds consumer data for
    ``adapter.channel_pairs()``; ``max_batches=None`` (all) calibration batches.
    """
    from ..models.registry import adapt

    adapter = adapt(model)
    net = adapter.model
    mods = adapter.weights()
    if weights is not None:
        missing = [w for w in weights if w not in mods and w.removesuffix(".weight") not in mods]
        if missing:
            raise HeartError(f"unknown weight(s) {', '.join(missing)}: choose from {', '.join(sorted(mods))}")
        mods = {k: v for k, v in mods.items() if k in weights or param_name(k) in weights}
    if not mods:
        raise HeartError("the model has no prunable weights for pair merging")
    names = list(mods)
    params = [mods[n].weight for n in names]
    pairs: list[ChannelPair] = [cp for cp in adapter.channel_pairs() if cp.producer in mods] if channel else []
    all_mods = dict(adapter.weights())

    was_training = net.training
    net.eval()
    req = {p: p.requires_grad for p in net.parameters()}
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    grams = {n: _GramHook(mods[n], "reduction") for n in names  # grouped convs: no shared reduction axis
             if _reduction_size(mods[n]) <= max_gram and getattr(mods[n], "groups", 1) == 1}
    cgrams = {cp.consumer: _GramHook(all_mods[cp.consumer], "channel") for cp in pairs}
    consumer_params = [all_mods[cp.consumer].weight for cp in pairs]
    extra = [p for p in consumer_params if all(p is not q for q in params)]
    for p in extra:
        p.requires_grad_(True)
    hparams = params + extra
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in hparams]
    curv: dict[str, float] = {}
    n_total = 0
    try:
        with _math_attention():
            for bi, batch in enumerate(calib):
                if max_batches is not None and bi >= max_batches:
                    break
                x, y = _split(batch)
                bs = _batch_size(x)
                with torch.no_grad():
                    dense = adapter.forward(x).detach()  # gram hooks record on this forward
                for h in list(grams.values()) + list(cgrams.values()):
                    h.handle.remove()

                def loss_fn() -> torch.Tensor:
                    return calibration_loss(adapter.forward(x), dense, y, loss, _mask(x))

                diag = hutchinson_diag(loss_fn, hparams, n_probes=probes, seed=seed + bi)
                for a, d in zip(acc, diag):
                    a.add_(d.double(), alpha=bs)
                if bi == 0 and power_iters > 0:
                    for n, p in zip(names + [None] * len(extra), hparams):
                        key = n if n is not None else id(p)
                        eig, _ = power_iteration(loss_fn, [p], iters=power_iters, tol=1e-4, seed=seed)
                        curv[key] = float(eig)
                n_total += bs
                for h in list(grams.values()) + list(cgrams.values()):  # re-arm for the next batch
                    h.handle = h.module.register_forward_pre_hook(h)
    finally:
        for h in list(grams.values()) + list(cgrams.values()):
            h.handle.remove()
        for p, r in req.items():
            p.requires_grad_(r)
        net.train(was_training)
    if n_total == 0:
        raise HeartError("the calibration data is empty: give at least one batch")

    hdiag = {id(p): (a / n_total).float().cpu().numpy() for p, a in zip(hparams, acc)}
    out: dict[str, PairsEntry] = {}
    for n, p in zip(names, params):
        e: PairsEntry = {
            "name": np.array(param_name(n)), "sha": np.array(weight_sha(p)),
            "shape": np.array(p.shape, dtype=np.int64), "weight": p.detach().float().cpu().numpy().copy(),
            "hdiag": hdiag[id(p)], "curvature": np.array(curv.get(n, np.inf), dtype=np.float64),
            "kind": np.array("conv" if p.dim() == 4 else "linear"),
        }
        if n in grams and grams[n].value() is not None:
            e["gram"] = grams[n].value()
        out[param_name(n)] = e
    for cp in pairs:
        c = all_mods[cp.consumer].weight
        if c.shape[1] != mods[cp.producer].weight.shape[0]:
            raise HeartError(f"channel pair {cp.producer} -> {cp.consumer} does not match "
                             f"({tuple(mods[cp.producer].weight.shape)} vs {tuple(c.shape)})")
        e = out[param_name(cp.producer)]
        ckey = cp.consumer if cp.consumer in names else id(c)
        e.update({
            "consumer": np.array(param_name(cp.consumer)), "consumer_sha": np.array(weight_sha(c)),
            "consumer_shape": np.array(c.shape, dtype=np.int64), "consumer_weight": c.detach().float().cpu().numpy().copy(),
            "consumer_hdiag": hdiag[id(c)], "consumer_curvature": np.array(curv.get(ckey, np.inf), dtype=np.float64),
        })
        if cgrams[cp.consumer].value() is not None:
            e["consumer_gram"] = cgrams[cp.consumer].value()
    return out
