"""Model zoo: random-init geometry builders (nothing downloads) and local loading.

Full-size builders use the published configurations, so FLOPs, shapes, parameter counts and
speed are those of the real models (the weights are random; load trained ones with
:func:`load_local`):

| name | family | config | parameters |
|---|---|---|---|
| `vit_ti_16` / `deit_ti_16` | timm ViT | 224px, patch 16, D 192, 12 layers, 3 heads | 5,717,416 |
| `vit_s_16` / `deit_s_16` | timm ViT | D 384, 12 layers, 6 heads | 22,050,664 |
| `vit_b_16` / `deit_b_16` | timm ViT | D 768, 12 layers, 12 heads | 86,567,656 |
| `deit_*_16(distilled=True)` | timm `VisionTransformerDistilled` | + distillation token and head | 5.9M / 22.4M / 87.3M |
| `pythia-70m` ... `pythia-1.4b` | HF GPT-NeoX | see ``PYTHIA`` | 70,426,624 ... 1,414,647,808 |
| `resnet18` | torchvision | ImageNet ResNet-18 | 11,689,512 |
| `resnet56` | CIFAR ResNet (He et al. 2016, option A shortcut) | 3 stages x 9 BasicBlocks, 16/32/64 ch | 853,018 |
| `mobilenetv2` | torchvision MobileNetV2 1.0 | | 3,504,872 |

Every transformer is built for second-order work: timm ViTs with ``fused_attn = False``, HF models
with ``attn_implementation="eager"``. Tiny variants (``tiny_*``) are for tests.
``build(name, **kw)`` maps CLI names (``vit_b_16``, ``pythia-70m``, ``tiny_vit``, ...) to builders.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .._deps import require
from ..errors import HeartError


# ----------------------------------------------------------------------------------------- timm ViT
def _unfuse(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


def _timm_vit(embed_dim: int, depth: int, heads: int, img: int = 224, patch: int = 16, num_classes: int = 1000,
              distilled: bool = False, in_chans: int = 3, mlp_ratio: float = 4.0) -> nn.Module:
    vt = require("timm.models.vision_transformer", "timm ViT builders")
    kw = dict(img_size=img, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
              num_classes=num_classes, in_chans=in_chans, qkv_bias=True)
    if distilled:
        deit = require("timm.models.deit", "DeiT distilled builders")
        model = deit.VisionTransformerDistilled(**kw)
    else:
        model = vt.VisionTransformer(**kw)
    return _unfuse(model.eval())


def vit_ti_16(num_classes: int = 1000) -> nn.Module:
    """ViT-Ti/16 at 224px (timm ``vit_tiny_patch16_224``): D 192, 12 layers, 3 heads."""
    return _timm_vit(192, 12, 3, num_classes=num_classes)


def vit_s_16(num_classes: int = 1000) -> nn.Module:
    """ViT-S/16 at 224px (timm ``vit_small_patch16_224``): D 384, 12 layers, 6 heads."""
    return _timm_vit(384, 12, 6, num_classes=num_classes)


def vit_b_16(num_classes: int = 1000) -> nn.Module:
    """ViT-B/16 at 224px (timm ``vit_base_patch16_224``): D 768, 12 layers, 12 heads, 86.6M parameters."""
    return _timm_vit(768, 12, 12, num_classes=num_classes)


def deit_ti_16(num_classes: int = 1000, distilled: bool = False) -> nn.Module:
    """DeiT-Ti/16 (``deit_tiny_patch16_224``; ``distilled=True``: ``deit_tiny_distilled_patch16_224``, 2 prefix tokens)."""
    return _timm_vit(192, 12, 3, num_classes=num_classes, distilled=distilled)


def deit_s_16(num_classes: int = 1000, distilled: bool = False) -> nn.Module:
    """DeiT-S/16 (``deit_small_patch16_224``; default distilled=False)."""
    return _timm_vit(384, 12, 6, num_classes=num_classes, distilled=distilled)


def deit_b_16(num_classes: int = 1000, distilled: bool = False) -> nn.Module:
    """DeiT-B/16 (``deit_base_patch16_224``, 86.6M; ``distilled=True``: 87.3M)."""
    return _timm_vit(768, 12, 12, num_classes=num_classes, distilled=distilled)


def tiny_vit(depth: int = 2, dim: int = 32, heads: int = 4, img: int = 32, patch: int = 8, num_classes: int = 10,
             distilled: bool = False) -> nn.Module:
    """A tiny timm ViT for tests (defaults: depth 2, dim 32, 4 heads, 32px, patch 8 -> 17 tokens, 10 classes)."""
    return _timm_vit(dim, depth, heads, img=img, patch=patch, num_classes=num_classes, distilled=distilled)


def tiny_deit(**kw: Any) -> nn.Module:
    """``tiny_vit(distilled=True, ...)``: 2 prefix tokens (class + distillation)."""
    return tiny_vit(distilled=True, **kw)


# ----------------------------------------------------------------------------------------- registry
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vit_ti_16": vit_ti_16, "vit_s_16": vit_s_16, "vit_b_16": vit_b_16,
    "deit_ti_16": deit_ti_16, "deit_s_16": deit_s_16, "deit_b_16": deit_b_16,
    "tiny_vit": tiny_vit, "tiny_deit": tiny_deit,
}


def names() -> list[str]:
    """Every name ``build`` accepts."""
    return sorted(BUILDERS)


def build(name: str, **kw: Any) -> nn.Module:
    """Build a random-init model by zoo name (``vit_b_16``, ``pythia-70m``, ``tiny_vit``, ...), in eval mode."""
    key = name.strip().lower().replace("/", "_")
    fn = BUILDERS.get(key) or BUILDERS.get(key.replace("-", "_"))
    if fn is None:
        raise HeartError(f"unknown model {name!r}: choose one of {', '.join(names())} or load a local one with --model PATH")
    return fn(**kw).eval()
