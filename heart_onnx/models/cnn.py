"""Adapter for conv nets: ResNets (torchvision / timm BasicBlock and Bottleneck, the zoo's CIFAR
ResNet-56) and MobileNetV2 (torchvision ``InvertedResidual``, timm ``InvertedResidual`` and
``DepthwiseSeparableConv``).

Blocks (``num_layers``) are the residual blocks (any module with ``conv1, bn1, conv2, bn2``) and the
inverted residuals, in module order. ``weights()`` lists every ``Conv2d`` and ``Linear`` of the model
(stem, depthwise and classifier included) by parameter path.

``channel_pairs()`` lists only pairs whose hidden channels are *exactly removable*: channel ``c`` of
the producer is read by nothing but the consumer, through per-channel ops (BatchNorm, activation):

- ResNet blocks: ``conv1 -> bn1 -> relu -> conv2`` (Bottleneck: also ``conv2 -> bn2 -> relu -> conv3``),
  when both convs are ungrouped;
- MobileNetV2: the projection of a block without a residual connection -> BatchNorm -> the 1x1
  expansion (or the final 1x1 conv) of the next unit, when that unit has no residual connection
  either (a skip-add reads the channels too). ``expand -> dw`` is *not* a pair: the depthwise conv
  is grouped, so an expanded channel also carries the depthwise filter and the projection column;
  neither is ``stem -> dw``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import BlockInfo, ChannelPair, ModelAdapter


def _is_resblock(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Conv2d) for a in ("conv1", "conv2")) and all(
        isinstance(getattr(m, a, None), nn.BatchNorm2d) for a in ("bn1", "bn2"))


def _is_tv_inverted_residual(m: nn.Module) -> bool:
    return type(m).__name__ == "InvertedResidual" and hasattr(m, "use_res_connect") and isinstance(
        getattr(m, "conv", None), nn.Sequential)


def _is_timm_ir(m: nn.Module) -> bool:
    return type(m).__name__ in ("InvertedResidual", "DepthwiseSeparableConv") and hasattr(m, "has_skip") and \
        isinstance(getattr(m, "conv_dw", None), nn.Conv2d)


def _is_block(m: nn.Module) -> bool:
    return _is_resblock(m) or _is_tv_inverted_residual(m) or _is_timm_ir(m)


def is_supported_cnn(model: nn.Module) -> bool:
    """True when ``model`` has ResNet-style residual blocks or MobileNetV2 inverted residuals."""
    return any(_is_block(m) for m in model.modules())


def _ungrouped(c: nn.Module | None) -> bool:
    return isinstance(c, nn.Conv2d) and c.groups == 1


@dataclass
class _Unit:
    """One step of a straight chain (MobileNet-style): where its input enters and its output leaves."""

    first: nn.Module | None  # conv that reads the unit input (None: not a channel consumer we can shrink)
    last: nn.Module  # conv that writes the unit output
    last_norm: nn.Module | None  # per-channel module(s) right after ``last``
    residual: bool


class CNNAdapter(ModelAdapter):
    """Conv nets. ``input_size`` (default: the model's ``heart_onnx_input_shape`` attribute (C, H, W), timm's
    ``pretrained_cfg["input_size"]``, else ``(C, 224, 224)``) sets ``example_inputs``."""

    family = "cnn"
    kind = "classifier"

    def __init__(self, model: nn.Module, input_size: tuple[int, int, int] | None = None):
        super().__init__(model)
        self._names = {m: n for n, m in model.named_modules()}
        self._blocks = [m for m in model.modules() if _is_block(m)]
        self._input_size = tuple(input_size) if input_size else self._default_input_size()

    def _default_input_size(self) -> tuple[int, int, int]:
        size = getattr(self.model, "heart_onnx_input_shape", None)
        if size is None:
            cfg = getattr(self.model, "pretrained_cfg", None) or getattr(self.model, "default_cfg", None) or {}
            size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if size is None:
            first = next((m for m in self.model.modules() if isinstance(m, nn.Conv2d)), None)
            size = (first.in_channels if first is not None else 3, 224, 224)
        return tuple(int(s) for s in size)

    # ---- geometry
    @property
    def num_layers(self) -> int:
        return len(self._blocks)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self._input_size

    def geometry(self) -> dict[str, Any]:
        g = super().geometry()
        g.update(input_size=list(self._input_size), convs=sum(isinstance(m, nn.Conv2d) for m in self.model.modules()),
                 conv_layers=self.conv_layers())
        return g

    def conv_layers(self) -> list[dict[str, Any]]:
        """Every Conv2d/Linear with its output size at ``input_size`` (one batch-1 forward in eval mode,
        training mode restored): the layer list ``heart_onnx.flops`` counts."""
        out: list[dict[str, Any]] = []
        hooks = []

        def hook(mod: nn.Module, _inp: Any, y: torch.Tensor) -> None:
            if isinstance(mod, nn.Conv2d):
                out.append(dict(name=self._names[mod], in_ch=mod.in_channels, out_ch=mod.out_channels,
                                kernel=list(mod.kernel_size), groups=mod.groups, out_hw=[int(y.shape[-2]), int(y.shape[-1])]))
            else:
                rows = int(y[0].numel() // mod.out_features)  # positions the Linear is applied to
                out.append(dict(name=self._names[mod], in_ch=mod.in_features, out_ch=mod.out_features,
                                kernel=[1, 1], groups=1, out_hw=[rows, 1]))

        for m in self.model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                hooks.append(m.register_forward_hook(hook))
        training = self.model.training
        try:
            self.model.eval()
            p = next(self.model.parameters())
            with torch.no_grad():
                self.model(torch.zeros((1, *self._input_size), device=p.device, dtype=p.dtype))
        finally:
            self.model.train(training)
            for h in hooks:
                h.remove()
        return out

    def blocks(self) -> list[BlockInfo]:
        return [BlockInfo(i, 0, 0, None, self.block_weights(i)) for i in range(self.num_layers)]

    def block_module(self, layer: int) -> nn.Module:
        return self._blocks[layer]

    def name(self, module: nn.Module) -> str:
        return self._names[module]

    def block_weights(self, layer: int) -> dict[str, nn.Module]:
        blk = self._blocks[layer]
        return {self._names[m]: m for m in blk.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

    def weights(self) -> dict[str, nn.Module]:
        """Every Conv2d and Linear of the model (stem, blocks, depthwise, head), by parameter path."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}

    # ---- channel pairs
    def channel_pairs(self) -> list[ChannelPair]:
        pairs: list[ChannelPair] = []
        for blk in self._blocks:
            if not _is_resblock(blk):
                continue
            convs = [getattr(blk, f"conv{i}", None) for i in (1, 2, 3)]
            bns = [getattr(blk, f"bn{i}", None) for i in (1, 2, 3)]
            for i in range(2):
                prod, cons = convs[i], convs[i + 1]
                if _ungrouped(prod) and _ungrouped(cons) and isinstance(bns[i], nn.BatchNorm2d) \
                        and bns[i].num_features == prod.out_channels == cons.in_channels:
                    pairs.append(ChannelPair(self._names[prod], self._names[cons], (self._names[bns[i]],)))
        units = self._chain()
        for a, b in zip(units, units[1:]):
            if a.residual or b.residual or not _ungrouped(a.last) or not _ungrouped(b.first):
                continue
            if a.last.out_channels != b.first.in_channels:
                continue
            between = (self._names[a.last_norm],) if a.last_norm is not None else ()
            pairs.append(ChannelPair(self._names[a.last], self._names[b.first], between))
        return pairs

    def _chain(self) -> list[_Unit]:
        """MobileNet-style straight chain: torchvision ``features`` or timm ``conv_stem, blocks, conv_head``."""
        units: list[_Unit] = []
        feats = getattr(self.model, "features", None)
        if isinstance(feats, nn.Sequential) and any(_is_tv_inverted_residual(m) for m in feats):
            for m in feats:
                if _is_tv_inverted_residual(m):
                    layers = list(m.conv)
                    first = layers[0][0] if isinstance(layers[0], nn.Sequential) else layers[0]
                    units.append(_Unit(first, layers[-2], layers[-1], bool(m.use_res_connect)))
                elif isinstance(m, nn.Sequential) and m and isinstance(m[0], nn.Conv2d):  # Conv2dNormActivation
                    norm = m[1] if len(m) > 1 and isinstance(m[1], nn.BatchNorm2d) else None
                    units.append(_Unit(m[0], m[0], norm, False))
                else:
                    units.append(_Unit(None, m, None, True))  # unknown: breaks the chain
            return units
        stem, head, blocks = (getattr(self.model, a, None) for a in ("conv_stem", "conv_head", "blocks"))
        if isinstance(stem, nn.Conv2d) and isinstance(blocks, nn.Sequential):
            units.append(_Unit(stem, stem, getattr(self.model, "bn1", None), False))
            for stage in blocks:
                for m in (stage if isinstance(stage, nn.Sequential) else [stage]):
                    if _is_timm_ir(m):
                        if type(m).__name__ == "InvertedResidual" and getattr(m, "conv_s2d", None) is None:
                            units.append(_Unit(m.conv_pw, m.conv_pwl, m.bn3, bool(m.has_skip)))
                        else:  # DepthwiseSeparableConv: input goes into a depthwise conv
                            units.append(_Unit(None, m.conv_pw, m.bn2, bool(m.has_skip)))
                    else:
                        units.append(_Unit(None, m, None, True))
            if isinstance(head, nn.Conv2d):
                units.append(_Unit(head, head, getattr(self.model, "bn2", None), False))
        return units

    # ---- running
    def forward(self, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, dict):
            inputs = inputs["pixel_values"]
        return self.model(inputs)

    def example_inputs(self, batch: int = 1, seq_len: int | None = None) -> torch.Tensor:
        """``pixel_values`` (batch, C, H, W) standard normal at ``input_size``; ``seq_len`` is ignored."""
        p = next(self.model.parameters())
        return torch.randn(batch, *self._input_size, dtype=p.dtype, device=p.device)
