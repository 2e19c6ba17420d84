"""The masked PyTorch reference for weight-pair merges: apply ``WeightMerge``s to a torch model.

Implements the MERGE RULE of ``heart_onnx.plan`` with torch ops (independently of the numpy
``heart_onnx.pairing.apply_rule`` that surgery uses), on parameters found by name
(``model.get_parameter(merge.weight)``). Before touching a weight its SHA-256 must equal the merge's
``weight_sha`` (and ``consumer_sha`` for channel merges), otherwise :class:`PlanMismatch`.

Channel mode zeroes the producer's rows ``pruned`` (and its bias entries) instead of removing them;
the consumer's merged columns ``pruned`` are zero, so nothing downstream reads those channels and the
function equals the surgically shrunk graph's.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import PlanMismatch
from ..plan import WeightMerge
from .fingerprint import weight_sha


def _param(model: nn.Module, name: str) -> nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise PlanMismatch(f"the model has no parameter {name!r}: this plan was made for another model; "
                           f"re-run 'heart-onnx analyze' and 'heart-onnx plan' on this model") from None


def _check(p: torch.Tensor, name: str, sha: str | None, shape: Sequence[int] | None) -> None:
    if shape is not None and tuple(p.shape) != tuple(shape):
        raise PlanMismatch(f"{name} has shape {tuple(p.shape)}, the plan expects {tuple(shape)}: "
                           f"re-run 'heart-onnx plan' on this model")
    if sha is not None and weight_sha(p) != sha:
        raise PlanMismatch(f"{name} differs from the weight the plan was made for (sha {sha[:12]}): "
                           f"re-run 'heart-onnx analyze' and 'heart-onnx plan' on this model")


def _bias_of(model: nn.Module, weight_name: str) -> torch.Tensor | None:
    if not weight_name.endswith(".weight"):
        return None
    try:
        return model.get_parameter(weight_name[: -len("weight")] + "bias")
    except AttributeError:
        return None


@torch.no_grad()
def apply_merges(model: nn.Module, merges: Sequence[WeightMerge], check: bool = True) -> nn.Module:
    """Apply ``merges`` to ``model`` in place and return it; ``check=True`` (default) verifies every sha first."""
    if check:  # all checks before any write, so a mismatch leaves the model untouched
        for m in merges:
            _check(_param(model, m.weight), m.weight, m.weight_sha, m.shape)
            if m.granularity == "channel":
                if m.consumer is None:
                    raise PlanMismatch(f"channel merge of {m.weight} has no consumer: regenerate the plan")
                _check(_param(model, m.consumer), m.consumer, m.consumer_sha, m.consumer_shape)
    for m in merges:
        p = _param(model, m.weight)
        pruned = torch.as_tensor(m.pruned, dtype=torch.long, device=p.device)
        partner = torch.as_tensor(m.partner, dtype=torch.long, device=p.device)
        coef = torch.as_tensor(m.coef, dtype=p.dtype, device=p.device)
        if m.granularity in ("unstructured", "2:4"):
            flat = p.data.view(-1)
            orig = flat[pruned].clone()
            flat.index_add_(0, partner, coef * orig)
            flat[pruned] = 0
        elif m.granularity == "channel":
            c = _param(model, m.consumer)
            cols = c.data.transpose(0, 1)  # (C, out, ...) view of the consumer's input columns
            orig = cols[pruned].clone()
            cols.index_add_(0, partner, coef.view(-1, *([1] * (cols.dim() - 1))) * orig)
            cols[pruned] = 0
            p.data[pruned] = 0
            bias = _bias_of(model, m.weight)
            if bias is not None:
                bias.data[pruned] = 0
        else:
            raise PlanMismatch(f"unknown granularity {m.granularity!r} in the plan: regenerate it with this heart-onnx")
    return model


def merged(model: nn.Module, merges: Sequence[WeightMerge], check: bool = True) -> nn.Module:
    """A deep copy of ``model`` with ``merges`` applied (the original is untouched)."""
    return apply_merges(copy.deepcopy(model), merges, check=check)


@contextlib.contextmanager
def merges_applied(model: nn.Module, merges: Sequence[WeightMerge], check: bool = True) -> Iterator[nn.Module]:
    """Context manager: ``merges`` applied in place inside, every touched parameter restored on exit."""
    names = set()
    for m in merges:
        names.add(m.weight)
        if m.granularity == "channel" and m.consumer:
            names.add(m.consumer)
            b = m.weight[: -len("weight")] + "bias" if m.weight.endswith(".weight") else None
            if b is not None and _bias_of(model, m.weight) is not None:
                names.add(b)
    saved = {n: _param(model, n).detach().clone() for n in names}
    try:
        yield apply_merges(model, merges, check=check)
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                _param(model, n).data.copy_(t)
