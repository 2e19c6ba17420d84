"""Shared machinery of the Hugging Face adapters (ViT/DeiT, GPT-NeoX, BERT-like).

HF renames modules between major versions (transformers 4: ``encoder.layer[i].attention.attention.query``,
5: ``layers[i].attention.q_proj``), so each adapter lists candidate dotted paths per role and the
first that exists wins. Attention probabilities come from the eager attention path: the module that
calls the attention interface returns ``(attn_output, attn_weights)`` and, with
``attn_implementation="eager"``, ``attn_weights`` are the post-softmax probabilities (B, H, N, N)
(dropout is identity in eval mode). Adapters switch the model to eager on construction: it computes
the same function as SDPA and, unlike SDPA on CPU, has a double backward (needed by HVPs).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..errors import HeartError
from .base import AttentionProbs, ChannelPair, ModelAdapter


def get_path(root: nn.Module, path: str) -> nn.Module | None:
    """``root.a.b.0.c`` for ``"a.b.0.c"``; None when any step is missing. ``""`` is ``root``."""
    m: object = root
    for part in path.split(".") if path else ():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            idx = int(part)
            if idx >= len(m):
                return None
            m = m[idx]
        else:
            m = getattr(m, part, None)
        if m is None:
            return None
    return m if isinstance(m, nn.Module) else None


def first_path(root: nn.Module, candidates: Sequence[str]) -> tuple[str, nn.Module] | None:
    for c in candidates:
        m = get_path(root, c)
        if m is not None:
            return c, m
    return None


def set_eager(model: nn.Module) -> None:
    """Switch an HF model to eager attention (no-op when it already is)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", "eager") == "eager":
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # transformers 4.x before set_attn_implementation
        cfg._attn_implementation = "eager"
    if getattr(cfg, "_attn_implementation", None) != "eager":
        raise HeartError("could not switch this model to eager attention: load it with attn_implementation='eager'")


class HFTransformerAdapter(ModelAdapter):
    """Base for HF transformer adapters. Subclasses set the role paths below (relative to one layer).

    - ``LAYERS``: candidate paths (from the model) of the ``nn.ModuleList`` of blocks.
    - ``ROLES``: role -> candidate paths inside a block. Roles: ``head_input`` (output projection),
      ``attn`` (module that returns ``(out, probs)``), ``q``, ``k``, ``v`` or ``qkv``, ``fc1``, ``fc2``.
    """

    LAYERS: tuple[str, ...] = ()
    ROLES: dict[str, tuple[str, ...]] = {}
    WEIGHT_ROLES: tuple[str, ...] = ()  # roles listed by block_weights, in order

    def __init__(self, model: nn.Module, eager: bool = True):
        super().__init__(model)
        if eager:
            set_eager(model)
        found = first_path(model, self.LAYERS)
        if found is None or not isinstance(found[1], nn.ModuleList) or len(found[1]) == 0:
            raise HeartError(f"cannot find the transformer blocks of {type(model).__name__} (looked for "
                             f"{', '.join(self.LAYERS)}): is this transformers version supported?")
        self._layers_path, self._layers = found
        self._role_path: dict[str, str] = {}
        blk0 = self._layers[0]
        for role, cands in self.ROLES.items():
            hit = first_path(blk0, cands)
            if hit is not None:
                self._role_path[role] = hit[0]
        missing = [r for r in ("head_input", "attn") if r not in self._role_path]
        if missing:
            raise HeartError(f"cannot find {', '.join(missing)} in the blocks of {type(model).__name__}: "
                             "is this transformers version supported?")
        self.config = getattr(model, "config", None)

    # ---- helpers
    def role(self, layer: int, role: str) -> nn.Module:
        path = self._role_path.get(role)
        if path is None:
            raise KeyError(f"{type(self).__name__} has no {role!r} module")
        m = get_path(self._layers[layer], path)
        assert m is not None
        return m

    def role_name(self, layer: int, role: str) -> str:
        return f"{self._layers_path}.{layer}.{self._role_path[role]}"

    # ---- geometry
    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads)

    def geometry(self) -> dict[str, Any]:
        """Base geometry plus the MLP width and classifier classes (for ``heart_onnx.flops``)."""
        g = super().geometry()
        if "fc1" in self._role_path:
            g["mlp_hidden"] = int(self.role(0, "fc1").out_features)
        if getattr(self, "kind", None) == "classifier" and self.config is not None:
            g["num_classes"] = int(getattr(self.config, "num_labels", 0) or 0)
        return g

    # ---- where things live
    def head_input_module(self, layer: int) -> nn.Module:
        return self.role(layer, "head_input")

    def block_module(self, layer: int) -> nn.Module:
        return self._layers[layer]

    @contextlib.contextmanager
    def attention_probs(self, layer: int) -> Iterator[AttentionProbs]:
        """Capture block ``layer``'s attention probabilities (B, H, N, N) from the eager attention output."""
        mod = self.role(layer, "attn")
        res = AttentionProbs()

        def hook(_m: nn.Module, _inp: object, out: object) -> None:
            w = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
            if not isinstance(w, torch.Tensor):
                raise HeartError("this model's attention does not return probabilities: build or load it with "
                                 "attn_implementation='eager'")
            res.probs.append(w)  # (B, H, N, N)

        h = mod.register_forward_hook(hook)
        try:
            yield res
        finally:
            h.remove()

    def block_weights(self, layer: int) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        for r in self.WEIGHT_ROLES:
            if r in self._role_path:
                out[self.role_name(layer, r)] = self.role(layer, r)
        return out

    def channel_pairs(self) -> list[ChannelPair]:
        if "fc1" not in self._role_path or "fc2" not in self._role_path:
            return []
        return [ChannelPair(self.role_name(i, "fc1"), self.role_name(i, "fc2")) for i in range(self.num_layers)]

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.model.parameters())
        return p.device, p.dtype


class HFTextAdapter(HFTransformerAdapter):
    """Shared part of the token-input HF adapters (BERT-like, GPT-NeoX): ``eager`` (default True) switches
    the model to eager attention; ``kind`` is ``KIND_HEAD_ATTRS``' kind when the model has one of those
    heads, else ``"encoder"``; inputs are ``input_ids`` (a tensor) or a dict, plus ``FORWARD_EXTRA``."""

    KIND_HEAD_ATTRS: tuple[str, ...] = ()  # attributes whose presence means a task head
    HEAD_KIND = "classifier"  # the kind with such a head
    FORWARD_EXTRA: dict[str, Any] = {}  # extra keyword arguments for every forward (e.g. use_cache=False)

    def __init__(self, model: nn.Module, eager: bool = True):
        super().__init__(model, eager=eager)
        self.kind = self.HEAD_KIND if any(hasattr(model, a) for a in self.KIND_HEAD_ATTRS) else "encoder"

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    def forward(self, inputs: Any) -> torch.Tensor:
        feed = dict(inputs) if isinstance(inputs, dict) else {"input_ids": inputs}
        return super().forward({**feed, **self.FORWARD_EXTRA})

    def example_inputs(self, batch: int = 1, seq_len: int | None = None) -> dict[str, torch.Tensor]:
        """``input_ids`` (batch, seq_len) random ids and an all-ones ``attention_mask`` (default seq_len 16)."""
        return text_inputs(self, self.vocab_size, batch, seq_len, 16, self.max_positions)


def text_inputs(adapter: ModelAdapter, vocab: int, batch: int, seq_len: int | None, default_len: int = 16,
                max_len: int | None = None) -> dict[str, torch.Tensor]:
    """``{"input_ids": (B, T) int64 in [0, vocab), "attention_mask": (B, T) int64 ones}``."""
    t = int(seq_len or default_len)
    if max_len is not None and t > max_len:
        raise HeartError(f"seq_len {t} exceeds this model's maximum of {max_len} positions")
    dev = next(adapter.model.parameters()).device
    return {
        "input_ids": torch.randint(0, vocab, (batch, t), dtype=torch.int64, device=dev),
        "attention_mask": torch.ones(batch, t, dtype=torch.int64, device=dev),
    }
