"""The masked PyTorch reference: a :class:`~heart_onnx.plan.Plan` applied to a torch model by masking.

This is what ONNX surgery is tested against (the invariant of DESIGN.md). Nothing is sliced:

- heads: a forward pre-hook on ``adapter.head_input_module(l)`` zeroes the columns ``h*Dh:(h+1)*Dh``
  of every removed head (B, N, H*Dh); with every head of a layer removed the projection outputs its
  bias only, which is what surgery's "attention branch removed, residual and bias kept" computes;
- tokens: a forward hook on ``adapter.block_module(l)`` replaces the block output (B, N, D) by
  :func:`select_tokens` (THE TOKEN RULE of ``heart_onnx.plan``), scores from
  ``adapter.attention_probs(l)`` averaged over the *kept* heads, or the plan's linear scorer;
- weights: ``heart_onnx.models.merge_weights.merges_applied`` (parameters restored on exit).

Attention masks (BERT): a 4-D additive mask ``(B|1, 1, N|1, N)`` that the model passes to its blocks
is gathered with the tokens (rows and columns; the fused token gets ``0``, i.e. "attend"), so padded
inputs stay exact. A 2-D padding mask handed to a block directly is not supported with token stages
(HeartError).

    with apply_plan(model, plan) as adapter:
        logits = adapter.forward(inputs)
    ref = MaskedModel(model, plan)      # the same as an nn.Module (hooks live while it exists)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import HeartError
from ..plan import Plan
from .base import ModelAdapter


# ------------------------------------------------------------------------------------ the token rule
def select_tokens(
    x: torch.Tensor, scores: torch.Tensor, keep: int, prefix: int, fuse: bool = False, scorer: str = "cls_attention",
) -> tuple[torch.Tensor, torch.Tensor]:
    """THE TOKEN RULE on ``x`` (B, N, D) with ``scores`` (B, N-P) of the non-prefix tokens.

    Returns ``(x_new, sel)``: ``x_new`` (B, K[+1], D) = prefix tokens, then the ``K-P`` kept tokens in
    descending score, then (``fuse=True``, default False) the score-weighted mean of the dropped ones;
    ``sel`` (B, K[+1]) int64 indices into the input sequence (``-1`` for the fused token).
    ``scorer`` (default ``"cls_attention"``) picks the fusion weights: ``s/sum(s)`` or ``softmax(s)``.
    """
    B, N, D = x.shape
    P = prefix
    k = keep - P
    if k <= 0 or keep > N:
        raise HeartError(f"token stage keeps {keep} of {N} tokens with {P} prefix tokens: keep must be in ({P}, {N}]")
    if fuse and keep >= N:
        raise HeartError(f"token stage keeps all {N} tokens, so there is nothing to fuse: lower keep or set fuse_dropped=False")
    rest = x[:, P:]  # (B, N-P, D)
    if fuse:
        order = scores.topk(N - P, dim=-1, largest=True, sorted=True).indices  # (B, N-P)
        idx, tail = order[:, :k], order[:, k:]  # (B, K-P), (B, N-K)
    else:
        idx = scores.topk(k, dim=-1, largest=True, sorted=True).indices  # (B, K-P)
    kept = rest.gather(1, idx.unsqueeze(-1).expand(B, k, D))  # (B, K-P, D)
    parts = [x[:, :P], kept]
    pre = torch.arange(P, device=x.device).expand(B, P)
    sels = [pre, idx + P]
    if fuse:
        s_t = scores.gather(1, tail)  # (B, N-K)
        w = s_t / s_t.sum(-1, keepdim=True) if scorer == "cls_attention" else torch.softmax(s_t, dim=-1)
        x_t = rest.gather(1, tail.unsqueeze(-1).expand(B, tail.shape[1], D))  # (B, N-K, D)
        parts.append(torch.matmul(w.unsqueeze(1), x_t))  # (B, 1, D)
        sels.append(torch.full((B, 1), -1, dtype=torch.long, device=x.device))
    return torch.cat(parts, dim=1), torch.cat(sels, dim=1)


def cls_attention_scores(probs: torch.Tensor, kept_heads: tuple[int, ...], prefix: int) -> torch.Tensor:
    """``mean over kept heads of probs[:, h, 0, P:]``: (B, H, N, N) -> (B, N-P)."""
    if not kept_heads:
        raise HeartError("cls_attention token scoring needs at least one kept head in the scoring layer: "
                         "keep a head there or use the linear scorer")
    idx = torch.as_tensor(kept_heads, dtype=torch.long, device=probs.device)
    return probs.index_select(1, idx)[:, :, 0, prefix:].mean(dim=1)  # (B, N-P)


def linear_scores(x: torch.Tensor, w: Any, b: float, prefix: int) -> torch.Tensor:
    """``x[:, P:] @ w + b``: (B, N, D) -> (B, N-P)."""
    wt = torch.as_tensor(w, dtype=x.dtype, device=x.device)  # (D,)
    return torch.matmul(x[:, prefix:], wt) + b


def _gather_mask(mask: torch.Tensor, sel: torch.Tensor, n_prev: int) -> torch.Tensor:
    """Select rows/columns of a 4-D attention mask (b, 1, q, k) by ``sel`` (B, K); ``-1`` -> attend."""
    B, K = sel.shape
    fill = True if mask.dtype == torch.bool else 0.0
    m = mask
    if m.shape[0] != B:
        m = m.expand(B, *m.shape[1:])
    safe = sel.clamp(min=0)
    fused = sel < 0  # (B, K)
    if m.shape[-1] == n_prev:
        ix = safe[:, None, None, :].expand(B, m.shape[1], m.shape[2], K)
        m = m.gather(3, ix).masked_fill(fused[:, None, None, :], fill)
    if m.shape[-2] == n_prev:
        ix = safe[:, None, :, None].expand(B, m.shape[1], K, m.shape[3])
        m = m.gather(2, ix).masked_fill(fused[:, None, :, None], fill)
    return m


# ------------------------------------------------------------------------------------------ checks
def check_plan(plan: Plan, adapter: ModelAdapter, check_fingerprint: bool = True) -> None:
    """Raise PlanMismatch/HeartError unless ``plan`` fits ``adapter``'s model (fingerprint, layers, heads)."""
    if check_fingerprint:
        from .fingerprint import fingerprint

        plan.check_model(fingerprint(adapter.model))
    L, H = adapter.num_layers, adapter.num_heads
    for layer, heads in plan.heads.items():
        if not 0 <= int(layer) < L:
            raise HeartError(f"plan removes heads of layer {layer}, the model has {L} layers: regenerate the plan")
        bad = [h for h in heads if not 0 <= int(h) < H]
        if bad:
            raise HeartError(f"plan removes heads {bad} of layer {layer}, the model has {H} heads: regenerate the plan")
    last = -1
    for t in plan.tokens:
        if not 0 <= t.after_layer < L:
            raise HeartError(f"token stage after layer {t.after_layer}: the model has {L} layers")
        if t.after_layer <= last:
            raise HeartError("token stages must be in increasing after_layer order, one per layer: regenerate the plan")
        last = t.after_layer
        if plan.token_scorer == "linear" and t.after_layer not in plan.scorers:
            raise HeartError(f"plan uses the linear token scorer but has no scorer for layer {t.after_layer}")


# -------------------------------------------------------------------------------------- the context
@dataclass
class _State:
    sel_mask: torch.Tensor | None = None  # the gathered mask blocks after a stage must use
    last_mask: Any = None  # the mask the current block was given
    n: int | None = None
    extra: dict = field(default_factory=dict)


def _adapter(model_or_adapter: nn.Module | ModelAdapter) -> ModelAdapter:
    if isinstance(model_or_adapter, ModelAdapter):
        return model_or_adapter
    from .registry import adapt

    return adapt(model_or_adapter)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_first(out: Any, x: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (x, *out[1:])
    if isinstance(out, list):
        return [x, *out[1:]]
    return x


@contextlib.contextmanager
def apply_plan(model_or_adapter: nn.Module | ModelAdapter, plan: Plan, *, check: bool = True) -> Iterator[ModelAdapter]:
    """Context manager: inside, the model computes ``plan`` applied by masking; yields the adapter.

    ``check`` (default True): verify the plan's fingerprint against the model (PlanMismatch otherwise)
    and the merges' weight hashes. Hooks are removed and merged weights restored on exit.
    """
    adapter = _adapter(model_or_adapter)
    check_plan(plan, adapter, check_fingerprint=check)
    H, Dh = adapter.num_heads, adapter.head_dim
    P = plan.prefix_tokens
    stages = {t.after_layer: t for t in plan.tokens}
    first_stage = min(stages) if stages else None
    state = _State()
    with contextlib.ExitStack() as stack:
        handles: list[Any] = []
        stack.callback(lambda: [h.remove() for h in handles])
        # ---- heads: zero the removed heads' columns of the output projection's input
        for layer, gone in sorted(plan.heads.items()):
            if not gone:
                continue
            cols = torch.zeros(H * Dh, dtype=torch.bool)
            for h in gone:
                cols[int(h) * Dh:(int(h) + 1) * Dh] = True

            def pre(_m: nn.Module, args: tuple, cols: torch.Tensor = cols) -> tuple:
                z = args[0]  # (B, N, H*Dh)
                keep = (~cols).to(device=z.device, dtype=z.dtype)
                return (z * keep, *args[1:])

            handles.append(adapter.head_input_module(layer).register_forward_pre_hook(pre))
        # ---- tokens
        if stages:
            probs = {}
            if plan.token_scorer == "cls_attention":
                for layer in stages:
                    probs[layer] = stack.enter_context(adapter.attention_probs(layer))

            def reset(_m: nn.Module, _a: Any) -> None:
                state.sel_mask = None
                state.last_mask = None

            handles.append(adapter.model.register_forward_pre_hook(reset))

            def block_pre(_m: nn.Module, args: tuple, kwargs: dict, layer: int = 0) -> Any:
                key, mask = None, None
                if len(args) > 1 and isinstance(args[1], torch.Tensor):
                    key, mask = 1, args[1]
                elif isinstance(kwargs.get("attention_mask"), torch.Tensor):
                    key, mask = "attention_mask", kwargs["attention_mask"]
                if first_stage is not None and layer > first_stage and mask is not None:
                    if state.sel_mask is None:
                        raise HeartError("token pruning with this attention mask is not supported: "
                                         "pass a 4-D mask or an all-ones attention_mask")
                    mask = state.sel_mask
                    if key == 1:
                        args = (args[0], mask, *args[2:])
                    else:
                        kwargs = {**kwargs, "attention_mask": mask}
                state.last_mask = mask
                return args, kwargs

            for layer in range(adapter.num_layers):
                handles.append(adapter.block_module(layer).register_forward_pre_hook(
                    lambda m, a, k, layer=layer: block_pre(m, a, k, layer), with_kwargs=True))

            def block_post(_m: nn.Module, _inp: Any, out: Any, layer: int = 0) -> Any:
                st = stages[layer]
                x = _first(out)  # (B, N, D)
                if plan.token_scorer == "cls_attention":
                    a = probs[layer].value  # (B, H, N, N)
                    probs[layer].probs.clear()
                    s = cls_attention_scores(a, plan.kept_heads(layer, H), P)
                else:
                    w, b = plan.scorers[layer]
                    s = linear_scores(x, w, b, P)
                x_new, sel = select_tokens(x, s, st.keep, P, plan.fuse_dropped, plan.token_scorer)
                m = state.last_mask
                if isinstance(m, torch.Tensor):
                    if m.dim() != 4:
                        raise HeartError(f"token pruning needs a 4-D attention mask in the blocks, got {m.dim()}-D: "
                                         "use an all-ones attention_mask or eager attention")
                    state.sel_mask = _gather_mask(m, sel, x.shape[1])
                return _replace_first(out, x_new)

            for layer in stages:
                handles.append(adapter.block_module(layer).register_forward_hook(
                    lambda m, i, o, layer=layer: block_post(m, i, o, layer)))
        # ---- weights
        if plan.merges:
            from .merge_weights import merges_applied

            stack.enter_context(merges_applied(adapter.model, plan.merges, check=check))
        yield adapter


class MaskedModel(nn.Module):
    """``nn.Module`` view of :func:`apply_plan`: ``forward(inputs)`` returns ``adapter.forward(inputs)``
    with the plan applied (hooks are installed for each call only). ``check`` as in apply_plan (default True)."""

    def __init__(self, model_or_adapter: nn.Module | ModelAdapter, plan: Plan, check: bool = True):
        super().__init__()
        self.adapter = _adapter(model_or_adapter)
        self.model = self.adapter.model
        self.plan = plan
        if check:
            check_plan(plan, self.adapter, check_fingerprint=True)

    def forward(self, inputs: Any) -> torch.Tensor:
        with apply_plan(self.adapter, self.plan, check=False):
            return self.adapter.forward(inputs)
