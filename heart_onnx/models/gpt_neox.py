"""Adapter for Hugging Face GPT-NeoX (Pythia): ``GPTNeoXForCausalLM`` and ``GPTNeoXModel``.

Block ``gpt_neox.layers.{i}``: ``attention.query_key_value`` (D -> 3D) is interleaved per head: head
``h`` owns output columns ``h*3*Dh:(h+1)*3*Dh`` (its ``[q | k | v]``, each ``Dh`` wide);
``attention.dense`` (D -> D) is the output projection (``head_input_module``: head ``h`` owns its
input columns ``h*Dh:(h+1)*Dh``); ``mlp.dense_h_to_4h`` -> GELU -> ``mlp.dense_4h_to_h`` is a
removable channel pair. Rotary embedding acts on the first ``rotary_ndims`` of each head's q and k.
No prefix tokens; the sequence length is set by the input (``seq_len`` is None). Eager attention is
switched on at construction (its probabilities are causal-masked, rows sum to 1).
"""
from __future__ import annotations

from typing import Any

from ._hf import HFTextAdapter


class GPTNeoXAdapter(HFTextAdapter):
    """HF GPT-NeoX / Pythia. ``eager`` (default True) switches the model to eager attention."""

    family = "gpt_neox"
    LAYERS = ("gpt_neox.layers", "layers")
    ROLES = {
        "head_input": ("attention.dense",),
        "attn": ("attention",),
        "qkv": ("attention.query_key_value",),
        "fc1": ("mlp.dense_h_to_4h",),
        "fc2": ("mlp.dense_4h_to_h",),
    }
    WEIGHT_ROLES = ("qkv", "head_input", "fc1", "fc2")

    KIND_HEAD_ATTRS = ("lm_head", "embed_out")
    HEAD_KIND = "lm"
    FORWARD_EXTRA = {"use_cache": False}

    @property
    def rotary_ndims(self) -> int:
        return int(self.role(0, "attn").rotary_ndims)

    def geometry(self) -> dict[str, Any]:
        g = super().geometry()
        g.update(rotary_ndims=self.rotary_ndims, vocab=self.vocab_size, qkv_layout="interleaved_per_head",
                 parallel_residual=bool(self.config.use_parallel_residual), lm_head=self.kind == "lm")
        return g

    def qkv_columns(self, head: int) -> slice:
        """Output columns of ``query_key_value`` owned by ``head`` (its q, k and v: ``3*Dh`` wide)."""
        w = 3 * self.head_dim
        return slice(head * w, (head + 1) * w)
