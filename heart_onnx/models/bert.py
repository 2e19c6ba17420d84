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

from torch import nn

from ._hf import HFTextAdapter, first_path

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


class BertAdapter(HFTextAdapter):
    """HF BERT-like encoder. ``eager`` (default True) switches the model to eager attention."""

    family = "bert"
    LAYERS = _LAYERS
    ROLES = _ROLES
    WEIGHT_ROLES = ("q", "k", "v", "head_input", "fc1", "fc2")

    KIND_HEAD_ATTRS = ("classifier",)
    HEAD_KIND = "classifier"

    @property
    def prefix_tokens(self) -> int:
        return 1

    def geometry(self) -> dict[str, Any]:
        g = super().geometry()
        # the pooler runs only under a classifier (an encoder's output is the last hidden state)
        g.update(vocab=self.vocab_size, pooler=self.kind == "classifier"
                 and any(n.split(".")[-1] == "pooler" for n, _ in self.model.named_modules()))
        return g
