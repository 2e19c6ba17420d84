"""Short fine-tuning that recovers a pruned model's accuracy while keeping the pruned structure.

The model is trained *through* the plan's masking hooks (``models.masking.apply_plan``): removed
heads stay zero at the output projection's input, tokens are dropped by the same run-time rule, so
what is learned is exactly what the surgically pruned ONNX model will compute. Removed heads' own
weights receive no gradient and do not matter (surgery slices them away). The loss is knowledge
distillation from the dense model (KL at temperature ``T``) plus, when labels exist, cross-entropy.

After training the weights changed, so the plan is re-bound to the new model (``rebase``): a new
fingerprint, same heads, tokens and scorers. Weight merges are not supported here (merged weights
would need their pair structure re-applied after every step): fine-tune before merging.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HeartError
from .plan import Plan


def _batch_len(x: Any) -> int:
    return int(next(iter(x.values())).shape[0]) if isinstance(x, dict) else int(x.shape[0])


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over samples (and positions) of KL(teacher || student), logits (..., C) -> scalar."""
    s = F.log_softmax(student.reshape(-1, student.shape[-1]), -1)  # (B*, C)
    t = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]), -1)  # (B*, C)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


@dataclass
class FinetuneResult:
    model: nn.Module
    plan: Plan
    epochs: int
    steps: int
    seconds: float
    losses: list[float]


def rebase(plan: Plan, model: nn.Module) -> Plan:
    """The same plan bound to ``model`` (new fingerprint and anchors), e.g. after fine-tuning."""
    from .models.fingerprint import fingerprint, weight_sha

    if plan.merges:
        raise HeartError("a plan with weight merges cannot be re-bound to changed weights: make the merges after fine-tuning")
    params = dict(model.named_parameters())
    anchors = {}
    for name in plan.anchors:
        key = name if name in params else f"{name}.weight"
        if key not in params:
            raise HeartError(f"plan anchor {name} is not a parameter of this model")
        anchors[name] = weight_sha(params[key])
    return plan.replace(fingerprint=fingerprint(model), anchors=anchors,
                        notes={**dict(plan.notes), "rebased_from": plan.fingerprint})


def finetune(model: nn.Module, plan: Plan, data: Iterable, *, epochs: int = 5, lr: float = 5e-4,
             weight_decay: float = 0.01, temperature: float = 2.0, alpha: float = 0.5, seed: int = 0,
             progress: Callable[[int, int, float], None] | None = None) -> FinetuneResult:
    """Fine-tune a copy of ``model`` under ``plan``; returns the new model and the re-bound plan.

    ``data``: batches ``(x, y)`` (labels may be None) re-iterated each epoch. Options (defaults):
    ``epochs=5``, ``lr=5e-4`` (AdamW), ``weight_decay=0.01``, ``temperature=2.0`` for distillation from
    the dense model, ``alpha=0.5`` weight of cross-entropy vs distillation (labels only), ``seed=0``,
    ``progress(epoch, epochs, mean_loss)``.
    """
    from .data import split_batch
    from .models.base import ModelAdapter
    from .models.masking import apply_plan
    from .models.registry import adapt

    if isinstance(model, ModelAdapter):
        model = model.model
    if plan.merges:
        raise HeartError("fine-tuning a plan with weight merges is not supported: fine-tune heads/tokens first, then merge")
    if epochs < 1:
        raise HeartError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    teacher = adapt(model.eval())
    student = copy.deepcopy(model).train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    batches = list(data)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * len(batches)))
    losses: list[float] = []
    steps = 0
    t0 = time.perf_counter()
    with apply_plan(student, plan, check=True) as masked:
        for epoch in range(epochs):
            total, n = 0.0, 0
            for batch in batches:
                x, y = split_batch(batch)
                with torch.no_grad():
                    t_logits = teacher.forward(x)  # (B, C) or (B, T, V)
                s_logits = masked.forward(x)  # (B, C) or (B, T, V)
                kd = _kl(s_logits / temperature, t_logits / temperature) * temperature ** 2
                loss = kd if y is None or s_logits.dim() != 2 else (1 - alpha) * kd + alpha * F.cross_entropy(s_logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                b = _batch_len(x)
                total += float(loss.detach()) * b
                n += b
                steps += 1
            losses.append(total / max(n, 1))
            if progress:
                progress(epoch + 1, epochs, losses[-1])
    student.eval()
    # the masked model was fingerprinted at entry; the trained weights now define a new model
    return FinetuneResult(student, rebase(plan, student), epochs, steps, time.perf_counter() - t0, losses)


@torch.no_grad()
def evaluate(model: nn.Module, plan: Plan | None, data: Iterable, *, dense: nn.Module | None = None,
             check: bool = True) -> dict[str, Any]:
    """Accuracy and losses of ``model`` under ``plan`` (masking; None = dense) on ``data``.

    Returns ``{"samples", "accuracy", "ce_loss", "kl_to_dense"}``: ``accuracy`` and ``ce_loss`` (mean
    cross-entropy, nats) when the batches have labels and the model is a classifier (logits (B, C)),
    else None; ``kl_to_dense`` (mean KL of the predictive distribution from ``dense``'s, nats) when
    ``dense`` (default None) is given. ``check`` (default True): check the plan's fingerprint.
    """
    import contextlib

    from .data import split_batch
    from .models.base import ModelAdapter
    from .models.masking import apply_plan
    from .models.registry import adapt

    adapter = model if isinstance(model, ModelAdapter) else adapt(model.eval())
    ref = None if dense is None else (dense if isinstance(dense, ModelAdapter) else adapt(dense.eval()))
    batches = [split_batch(b) for b in data]
    # dense outputs first, outside the plan's hooks (``dense`` may be the very module being masked)
    ref_logits = [ref.forward(x) for x, _ in batches] if ref is not None else None
    n = correct = 0
    ce = kl = 0.0
    labelled = True
    ctx = apply_plan(adapter, plan, check=check) if plan is not None else contextlib.nullcontext(adapter)
    with ctx as masked:
        for i, (x, y) in enumerate(batches):
            logits = masked.forward(x)  # (B, C) or (B, T, V)
            b = _batch_len(x)
            if ref_logits is not None:
                kl += float(_kl(logits, ref_logits[i])) * b
            if y is not None and logits.dim() == 2:
                correct += int((logits.argmax(-1) == y).sum())
                ce += float(F.cross_entropy(logits, y, reduction="sum"))
            else:
                labelled = False
            n += b
    if n == 0:
        raise HeartError("the evaluation data is empty: give a data spec with at least one sample")
    return {"samples": n, "accuracy": correct / n if labelled else None, "ce_loss": ce / n if labelled else None,
            "kl_to_dense": kl / n if ref is not None else None}
