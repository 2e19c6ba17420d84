"""Adapter for Hugging Face BERT-like encoders (``BertModel``, ``BertForSequenceClassification``, and
models with the same block layout: RoBERTa, ELECTRA, ...).

Block ``bert.encoder.layer.{i}``: ``attention.self.{query,key,value}``, ``attention.output.dense``
(output projection, ``head_input_module``), ``intermediate.dense`` -> act -> ``output.dense``
(a removable channel pair). Post-LayerNorm blocks. Prefix tokens: 1 ([CLS], which the pooler and
the classifier read). The sequence length is set by the input (``seq_len`` is None).
``example_inputs`` gives ``input_ids`` and ``attention_mask``. Eager attention is switched on.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._hf import HFTransformerAdapter, first_path, text_inputs

_LAYERS = ("bert.encoder.layer", "roberta.encoder.layer", "electra.encoder.layer", "encoder.layer")
_ROLES = {
    "head_input": ("attention.output.dense",),
    "attn": ("attention.self",),
    "q": ("attention.self.query",),
    "k": ("attention.self.key",),
    "v": ("attention.self.value",),
    "fc1": ("intermediate.dense",),
    "fc2": ("output.dense",),
}


def is_bert_like(model: nn.Module) -> bool:
    """True when ``model`` has ``encoder.layer[i]`` blocks with BERT's self-attention and FFN modules."""
    hit = first_path(model, _LAYERS)
    if hit is None or not isinstance(hit[1], nn.ModuleList) or len(hit[1]) == 0:
        return False
    blk = hit[1][0]
    return all(first_path(blk, _ROLES[r]) is not None for r in ("head_input", "q", "k", "v", "fc1", "fc2"))


class BertAdapter(HFTransformerAdapter):
    """HF BERT-like encoder. ``eager`` (default True) switches the model to eager attention."""

    family = "bert"
    LAYERS = _LAYERS
    ROLES = _ROLES
    WEIGHT_ROLES = ("q", "k", "v", "head_input", "fc1", "fc2")

    def __init__(self, model: nn.Module, eager: bool = True):
        super().__init__(model, eager=eager)
        self.kind = "classifier" if hasattr(model, "classifier") else "encoder"

    @property
    def prefix_tokens(self) -> int:
        return 1

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    def geometry(self) -> dict[str, Any]:
        g = super().geometry()
        # the pooler runs only under a classifier (an encoder's output is the last hidden state)
        g.update(vocab=self.vocab_size, pooler=self.kind == "classifier"
                 and any(n.split(".")[-1] == "pooler" for n, _ in self.model.named_modules()))
        return g

    def forward(self, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, dict):
            return super().forward(inputs)
        return super().forward({"input_ids": inputs})

    def example_inputs(self, batch: int = 1, seq_len: int | None = None) -> dict[str, torch.Tensor]:
        """``input_ids`` (batch, seq_len) random ids and an all-ones ``attention_mask`` (default seq_len 16)."""
        return text_inputs(self, self.vocab_size, batch, seq_len, 16, self.max_positions)
