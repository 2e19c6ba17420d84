"""Adapter for Hugging Face ViT and DeiT (``ViTForImageClassification``, ``ViTModel``,
``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``, ``DeiTModel``).

transformers 5: block ``vit.layers.{i}`` holds ``attention.{q,k,v,o}_proj`` and ``mlp.fc1/fc2``;
transformers 4: ``vit.encoder.layer.{i}`` holds ``attention.attention.{query,key,value}``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``. Both are recognised.
``head_input_module`` is the output projection (``o_proj`` / ``attention.output.dense``), whose input
is the head-major concatenation of head outputs. Prefix tokens: 1 ([CLS]) for ViT, 2 ([CLS] and
distillation) for DeiT. The model is switched to eager attention on construction.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._hf import HFTransformerAdapter


def _is_deit(model: nn.Module) -> bool:
    return any(c.__name__.startswith("DeiT") for c in type(model).__mro__)


class HFViTAdapter(HFTransformerAdapter):
    """HF ViT / DeiT. ``eager`` (default True) switches the model to eager attention."""

    family = "vit"
    LAYERS = ("vit.layers", "deit.layers", "layers", "vit.encoder.layer", "deit.encoder.layer", "encoder.layer")
    ROLES = {
        "head_input": ("attention.o_proj", "attention.output.dense"),
        "attn": ("attention", "attention.attention"),
        "q": ("attention.q_proj", "attention.attention.query"),
        "k": ("attention.k_proj", "attention.attention.key"),
        "v": ("attention.v_proj", "attention.attention.value"),
        "fc1": ("mlp.fc1", "intermediate.dense"),
        "fc2": ("mlp.fc2", "output.dense"),
    }
    WEIGHT_ROLES = ("q", "k", "v", "head_input", "fc1", "fc2")

    def __init__(self, model: nn.Module, eager: bool = True):
        super().__init__(model, eager=eager)
        # transformers 4: ``attention`` is a wrapper whose child ``attention`` returns the probabilities
        if self._role_path.get("head_input") == "attention.output.dense":
            self._role_path["attn"] = "attention.attention"
        self.kind = "classifier" if hasattr(model, "classifier") or hasattr(model, "cls_classifier") else "encoder"
        self._deit = _is_deit(model)

    @property
    def prefix_tokens(self) -> int:
        return 2 if self._deit else 1

    @property
    def image_size(self) -> int:
        s = self.config.image_size
        return int(s[0] if isinstance(s, (tuple, list)) else s)

    @property
    def patch_size(self) -> int:
        s = self.config.patch_size
        return int(s[0] if isinstance(s, (tuple, list)) else s)

    @property
    def seq_len(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + self.prefix_tokens

    @property
    def num_classes(self) -> int:
        return int(self.config.num_labels) if self.kind == "classifier" else 0

    def geometry(self) -> dict[str, Any]:
        """Plus the patch embedding and classifier count (DeiT with teacher: 2) for ``heart_onnx.flops``."""
        g = super().geometry()
        g.update(patch_size=self.patch_size, in_chans=int(getattr(self.config, "num_channels", 3)),
                 classifier_heads=2 if hasattr(self.model, "distillation_classifier") else 1)
        return g

    def forward(self, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, dict):
            return super().forward(inputs)
        return super().forward({"pixel_values": inputs})

    def example_inputs(self, batch: int = 1, seq_len: int | None = None) -> torch.Tensor:
        """``pixel_values`` (batch, C, H, W) standard normal; ``seq_len`` is fixed by the image size and ignored."""
        dev, dt = self._device_dtype()
        c = int(getattr(self.config, "num_channels", 3))
        return torch.randn(batch, c, self.image_size, self.image_size, device=dev, dtype=dt)
