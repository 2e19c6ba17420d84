"""One adapter interface every model family answers the same way.

An adapter wraps a ``torch.nn.Module`` and tells the rest of heart-onnx where its attention heads,
tokens and weights live, without any model-specific branches elsewhere:

- ``head_input_module(layer)``: the attention output projection; its *input* (B, N, H*Dh) is the
  concatenation of the per-head outputs, head ``h`` owning columns ``h*Dh:(h+1)*Dh``. Sensitivity
  hooks perturb it, the masked reference zeroes heads there.
- ``block_module(layer)``: the transformer block; its output (first element if a tuple) is the
  hidden state (B, N, D) that token stages act on.
- ``attention_probs(layer)``: a context manager that captures block ``layer``'s attention
  probabilities (B, H, N, N) on the next forward (for the class-token-attention scorer).
- ``weights()``: the prunable linear/conv weights by name; ``channel_pairs()``: producer/consumer
  pairs whose hidden channels can be merged and removed (fc1 -> fc2, conv -> bn -> act -> conv).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import torch
from torch import nn

Kind = Literal["classifier", "lm", "encoder"]


@dataclass(frozen=True)
class BlockInfo:
    index: int
    heads: int  # 0 for conv blocks
    head_dim: int
    seq_len: int | None  # tokens entering the block (None for LMs: set by the input)
    weights: dict[str, nn.Module] = field(default_factory=dict)  # name -> nn.Linear / nn.Conv2d


@dataclass(frozen=True)
class AttentionProbs:
    """Filled by ``ModelAdapter.attention_probs``: ``probs`` is (B, H, N, N) after the forward."""

    probs: list = field(default_factory=list)

    @property
    def value(self) -> torch.Tensor:
        if not self.probs:
            raise RuntimeError("no attention probabilities were captured: run a forward inside the context")
        return self.probs[-1]


@dataclass(frozen=True)
class ChannelPair:
    producer: str  # weight name whose output channels are merged/removed
    consumer: str  # weight name whose input channels read them
    between: tuple[str, ...] = ()  # modules in between that carry per-channel parameters (BatchNorm)


class ModelAdapter(ABC):
    family: str  # "vit", "gpt_neox", "bert", "cnn"
    kind: Kind  # "classifier": logits (B, C); "lm": logits (B, T, V); "encoder": hidden or pooled output

    def __init__(self, model: nn.Module):
        self.model = model

    # ---- geometry
    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @property
    def num_heads(self) -> int:
        return 0

    @property
    def head_dim(self) -> int:
        return 0

    @property
    def hidden_size(self) -> int:
        return 0

    @property
    def seq_len(self) -> int | None:
        """Tokens entering the first block (None for language models)."""
        return None

    @property
    def prefix_tokens(self) -> int:
        """Tokens that are never pruned (class/distillation tokens)."""
        return 0

    def geometry(self) -> dict[str, Any]:
        """JSON-able geometry recorded in plans and sensitivity files."""
        return {
            "family": self.family, "layers": self.num_layers, "heads": self.num_heads, "head_dim": self.head_dim,
            "hidden": self.hidden_size, "seq_len": self.seq_len, "prefix_tokens": self.prefix_tokens,
        }

    def blocks(self) -> list[BlockInfo]:
        return [
            BlockInfo(i, self.num_heads, self.head_dim, self.seq_len, self.block_weights(i)) for i in range(self.num_layers)
        ]

    # ---- where things live
    def head_input_module(self, layer: int) -> nn.Module:
        raise NotImplementedError(f"{self.family} has no attention heads")

    def block_module(self, layer: int) -> nn.Module:
        raise NotImplementedError(f"{self.family} has no token blocks")

    @contextlib.contextmanager
    def attention_probs(self, layer: int) -> Iterator[AttentionProbs]:
        raise NotImplementedError(f"{self.family} does not expose attention probabilities")
        yield  # pragma: no cover

    def block_weights(self, layer: int) -> dict[str, nn.Module]:
        return {}

    def weights(self) -> dict[str, nn.Module]:
        """All prunable Linear/Conv modules by parameter-path name (without the '.weight')."""
        out: dict[str, nn.Module] = {}
        for i in range(self.num_layers):
            out.update(self.block_weights(i))
        return out

    def channel_pairs(self) -> list[ChannelPair]:
        return []

    # ---- running
    def forward(self, inputs: Any) -> torch.Tensor:
        """Logits (classifier (B, C), lm (B, T, V)) or the model's main output tensor."""
        if isinstance(inputs, dict):
            out = self.model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = self.model(*inputs)
        else:
            out = self.model(inputs)
        if hasattr(out, "logits"):
            return out.logits
        if hasattr(out, "last_hidden_state"):
            return out.last_hidden_state
        if isinstance(out, (tuple, list)):
            return out[0]
        return out

    def example_inputs(self, batch: int = 1, seq_len: int | None = None) -> Any:
        """Random inputs of the right shape and dtype (for export and speed-only runs)."""
        raise NotImplementedError
