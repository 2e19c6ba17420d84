"""Adapter for timm ``VisionTransformer`` (ViT, DeiT, DeiT distilled).

Per block ``blocks.{i}``: ``attn.qkv`` (D -> 3*H*Dh, output columns ordered ``[q | k | v]``, each
head-major), ``attn.proj`` (H*Dh -> D; its input is the concatenated head outputs, head ``h`` owning
``h*Dh:(h+1)*Dh``), ``mlp.fc1`` -> GELU -> ``mlp.fc2`` (a removable hidden-channel pair).

On construction the adapter turns timm's fused attention off (``attn.fused_attn = False``) in every
block: the math path computes the same function, has a double backward on CPU (needed by HVPs) and
exposes the softmax probabilities as the input of ``attn.attn_drop``, where ``attention_probs`` hooks.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from .base import AttentionProbs, ChannelPair, ModelAdapter


def is_timm_vit(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return False
    return isinstance(model, VisionTransformer)


class TimmViTAdapter(ModelAdapter):
    """timm ViT / DeiT. ``unfuse`` (default True) sets ``fused_attn = False`` on every attention module."""

    family = "vit"

    def __init__(self, model: nn.Module, unfuse: bool = True):
        super().__init__(model)
        self.kind = "classifier" if getattr(model, "num_classes", 0) else "encoder"
        if unfuse:
            for blk in model.blocks:
                if hasattr(blk.attn, "fused_attn"):
                    blk.attn.fused_attn = False

    # ---- geometry
    @property
    def num_layers(self) -> int:
        return len(self.model.blocks)

    @property
    def num_heads(self) -> int:
        return int(self.model.blocks[0].attn.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.model.blocks[0].attn.head_dim)

    @property
    def hidden_size(self) -> int:
        return int(self.model.embed_dim)

    @property
    def prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def seq_len(self) -> int:
        return int(self.model.patch_embed.num_patches) + self.prefix_tokens

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.model.patch_embed.img_size)

    @property
    def in_chans(self) -> int:
        return int(self.model.patch_embed.proj.in_channels)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def geometry(self) -> dict[str, Any]:
        """Base geometry plus what ``heart_onnx.flops`` counts (patch embedding, MLP width, classifier)."""
        g = super().geometry()
        p = self.model.patch_embed.patch_size
        g.update(patch_size=[int(s) for s in p] if isinstance(p, (tuple, list)) else int(p), in_chans=self.in_chans,
                 img_size=list(self.image_size), num_classes=self.num_classes,
                 mlp_hidden=int(self.model.blocks[0].mlp.fc1.out_features),
                 classifier_heads=2 if getattr(self.model, "head_dist", None) is not None and self.num_classes else 1)
        return g

    # ---- where things live
    def head_input_module(self, layer: int) -> nn.Module:
        return self.model.blocks[layer].attn.proj

    def block_module(self, layer: int) -> nn.Module:
        return self.model.blocks[layer]

    @contextlib.contextmanager
    def attention_probs(self, layer: int) -> Iterator[AttentionProbs]:
        """Capture block ``layer``'s softmax probabilities (B, H, N, N): the input of ``attn.attn_drop``."""
        attn = self.model.blocks[layer].attn
        old = getattr(attn, "fused_attn", False)
        attn.fused_attn = False
        res = AttentionProbs()

        def hook(_mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            res.probs.append(inp[0])  # (B, H, N, N)

        h = attn.attn_drop.register_forward_pre_hook(hook)
        try:
            yield res
        finally:
            h.remove()
            attn.fused_attn = old

    def block_weights(self, layer: int) -> dict[str, nn.Module]:
        b = self.model.blocks[layer]
        p = f"blocks.{layer}"
        return {f"{p}.attn.qkv": b.attn.qkv, f"{p}.attn.proj": b.attn.proj, f"{p}.mlp.fc1": b.mlp.fc1, f"{p}.mlp.fc2": b.mlp.fc2}

    def channel_pairs(self) -> list[ChannelPair]:
        return [ChannelPair(f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2") for i in range(self.num_layers)]

    # ---- running
    def forward(self, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, dict):
            inputs = inputs["pixel_values"]
        return self.model(inputs)

    def example_inputs(self, batch: int = 1, seq_len: int | None = None) -> torch.Tensor:
        """``pixel_values`` (batch, C, H, W) standard normal; ``seq_len`` is fixed by the image size and ignored."""
        h, w = self.image_size
        p = next(self.model.parameters())
        return torch.randn(batch, self.in_chans, h, w, dtype=p.dtype, device=p.device)
