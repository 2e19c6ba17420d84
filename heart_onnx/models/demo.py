"""The embedded demo models: a small timm ViT and a small ResNet trained on scikit-learn's digits.

Both ship their weights inside the package (``heart_onnx/models/weights/``, plain state dicts loaded
with ``torch.load(..., weights_only=True)``) so every tutorial, test and CLI demo runs offline.
``scripts/train_demo.py --out heart_onnx/models/weights`` reproduces them (seeded, CPU, minutes).

Data and split (``DEMO_SPLIT``)
-------------------------------
scikit-learn's ``load_digits()``: 1797 grey 8x8 images, 10 classes, pixel values 0..16 (the data ships
with scikit-learn, nothing downloads). The split is fixed::

    x_tr, x_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    # 1347 | test 450 (held out: accuracy and every "measured on held-out" number)
    fit, val = train_test_split(arange(1347), test_size=300, random_state=0, stratify=y_tr)
    # train 1047 (the demo models are fitted on these only) | val 300 (never trained on)

The ``val`` split is the calibration split (``digits:calib`` is an alias of ``digits:val``): sensitivities
and the planner's calibration are computed on images the models never saw, so they are exchangeable with
deployment (held-out) data. Calibrating on training images under-predicts held-out loss changes 4-6x
(the models are over-confident on images they fitted).

Inputs
------
One tensor ``pixel_values`` of shape (B, 1, 8, 8), float32, normalised as
``x = (pixels / 16 - 0.5) / 0.5`` (so values lie in [-1, 1]; ``DIGITS_MEAN = DIGITS_STD = 0.5`` on
the 0..1 scale, which is also what an image folder of digit-like PNGs is normalised with).
Outputs: logits (B, 10).

Models
------
- ``demo_vit()``: timm ``VisionTransformer`` (img 8, patch 2 -> 16 patches + class token = 17 tokens,
  depth 4, dim 64, 8 heads of head dim 8, MLP 128; ``VIT_CONFIG``), class-token pooling; 136,138
  parameters. Shipped weights: 437/450 = 0.9711 held-out accuracy (val 293/300 = 0.977).
- ``demo_cnn()``: ``DigitsResNet``: stem conv3x3 -> 3 stages of torchvision ``BasicBlock`` (16, 32, 64
  channels; strides 1, 2, 2, 1x1-conv downsample where shape changes) -> global average pool -> fc;
  77,754 parameters. Shipped weights: 447/450 = 0.9933 held-out accuracy (val 298/300 = 0.993).

``weights/demo.json`` records these numbers, the split, seed, epochs, recipe and versions
(``demo_meta()``); the tests recompute them.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._deps import require
from ..errors import HeartError

WEIGHTS_DIR = Path(__file__).with_name("weights")
VIT_WEIGHTS = "demo_vit.pt"
CNN_WEIGHTS = "demo_cnn.pt"
META_FILE = "demo.json"

INPUT_NAME = "pixel_values"
INPUT_SHAPE = (1, 8, 8)  # (C, H, W) without the batch dimension
NUM_CLASSES = 10
DIGITS_MEAN = 0.5  # on the 0..1 scale (pixels / 16)
DIGITS_STD = 0.5

DEMO_SPLIT: dict[str, Any] = {
    "dataset": "sklearn.datasets.load_digits",
    "test_size": 0.25,
    "random_state": 0,
    "stratify": True,
    "val_size": 300,
    "val_random_state": 0,
    "n_train": 1047,
    "n_val": 300,
    "n_test": 450,
    "calib": "val",
    "normalisation": "(pixels / 16 - 0.5) / 0.5",
    "code": "tr, te = train_test_split(arange(1797), test_size=0.25, random_state=0, stratify=y); "
            "fit, val = train_test_split(arange(1347), test_size=300, random_state=0, stratify=y[tr]); "
            "train = tr[fit], val = tr[val], test = te, calib = val",
}

VIT_CONFIG: dict[str, Any] = dict(
    img_size=8, patch_size=2, in_chans=1, num_classes=NUM_CLASSES, embed_dim=64, depth=4, num_heads=8,
    mlp_ratio=2.0, qkv_bias=True, class_token=True, global_pool="token",
)
CNN_CONFIG: dict[str, Any] = dict(in_chans=1, num_classes=NUM_CLASSES, widths=(16, 32, 64), strides=(1, 2, 2), blocks=(1, 1, 1))


# ---------------------------------------------------------------------------------------------- data
def normalise_digits(pixels: torch.Tensor) -> torch.Tensor:
    """Raw digits pixels 0..16 (any shape) -> model input scale ``(p / 16 - 0.5) / 0.5``."""
    return (pixels.float() / 16.0 - DIGITS_MEAN) / DIGITS_STD


@lru_cache(maxsize=1)
def _split_indices() -> tuple[Any, Any, Any]:
    import numpy as np

    require("sklearn", "the digits data set")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=DEMO_SPLIT["test_size"], random_state=DEMO_SPLIT["random_state"], stratify=y)
    fit, val = train_test_split(
        np.arange(len(tr)), test_size=DEMO_SPLIT["val_size"], random_state=DEMO_SPLIT["val_random_state"], stratify=y[tr]
    )
    return d.images.astype(np.float32), y, (tr[fit], te, tr[val])


def _take(idx: Any, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images, y, _ = _split_indices()
    x = torch.from_numpy(images[idx]).unsqueeze(1)  # (N, 1, 8, 8)
    if normalise:
        x = normalise_digits(x)
    return x, torch.from_numpy(y[idx])


def digits_split(normalise: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed demo split: ``(x_train (1047,1,8,8), y_train (1047,), x_test (450,1,8,8), y_test (450,))``.

    ``normalise`` (default True) applies the model input normalisation; False returns raw pixels 0..16.
    Labels are int64. The 300 ``val`` images (:func:`digits_val`) are in neither. See ``DEMO_SPLIT``.
    """
    tr, te, _ = _split_indices()[2]
    return (*_take(tr, normalise), *_take(te, normalise))


def digits_val(normalise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The 300-image validation/calibration split (never trained on): ``(x (300,1,8,8), y (300,))``."""
    return _take(_split_indices()[2][2], normalise)


def digits_calibration(normalise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration split: the same 300 images as :func:`digits_val`."""
    return digits_val(normalise)


# -------------------------------------------------------------------------------------------- models
def build_vit(**overrides: Any) -> nn.Module:
    """The demo ViT architecture with random weights (``VIT_CONFIG`` updated by ``overrides``).

    Attention uses the explicit softmax path (``attn.fused_attn = False``) so that double backward
    (HVPs) works on CPU and attention probabilities can be hooked; the function is identical.
    """
    require("timm", "the demo ViT")
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**{**VIT_CONFIG, **overrides})
    model.heart_onnx_input_shape = (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)  # (C, H, W)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    return model


class DigitsResNet(nn.Module):
    """A small ResNet with torchvision ``BasicBlock``s and torchvision ``ResNet`` attribute names.

    stem ``conv1`` (3x3, stride 1) -> ``bn1`` -> ``relu`` -> ``layer1..layerK`` -> ``avgpool`` -> ``fc``.
    Defaults: ``in_chans=1, num_classes=10, widths=(16, 32, 64), strides=(1, 2, 2), blocks=(1, 1, 1)``.
    """

    heart_onnx_input_shape = INPUT_SHAPE  # (C, H, W): read by heart_onnx.data (a conv net has no fixed size)

    def __init__(self, in_chans: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64),
                 strides: tuple[int, ...] = (1, 2, 2), blocks: tuple[int, ...] = (1, 1, 1)):
        super().__init__()
        require("torchvision", "the demo CNN")
        from torchvision.models.resnet import BasicBlock

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        self.num_stages = len(widths)
        for s, (w, st, nb) in enumerate(zip(widths, strides, blocks)):
            layers = []
            for b in range(nb):
                stride = st if b == 0 else 1
                down = None
                if stride != 1 or cin != w:
                    down = nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
                layers.append(BasicBlock(cin, w, stride=stride, downsample=down))
                cin = w
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, C0, 8, 8)
        for s in range(self.num_stages):
            x = getattr(self, f"layer{s + 1}")(x)  # (B, Cs, H/stride, W/stride)
        x = torch.flatten(self.avgpool(x), 1)  # (B, C)
        return self.fc(x)  # (B, num_classes)


def build_cnn(**overrides: Any) -> nn.Module:
    """The demo CNN architecture with random weights (``CNN_CONFIG`` updated by ``overrides``)."""
    return DigitsResNet(**{**CNN_CONFIG, **overrides})


def _load_state(model: nn.Module, path: Path | str) -> nn.Module:
    path = Path(path)
    if not path.is_file():
        raise HeartError(f"demo weights {path} not found: reinstall heart-onnx or run "
                         f"'python scripts/train_demo.py --out {path.parent}'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file
        raise HeartError(f"cannot read demo weights {path} ({type(exc).__name__}): retrain them with scripts/train_demo.py") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise HeartError(f"demo weights {path} do not fit the demo architecture ({first}): retrain with scripts/train_demo.py") from None
    return model


def demo_vit(pretrained: bool = True, weights: str | Path | None = None) -> nn.Module:
    """The demo ViT in eval mode; ``pretrained`` (default True) loads the shipped weights
    (or ``weights``, default None = the shipped file). Input (B, 1, 8, 8), see the module docstring."""
    model = build_vit()
    if pretrained or weights is not None:
        _load_state(model, weights or WEIGHTS_DIR / VIT_WEIGHTS)
    return model.eval()


def demo_cnn(pretrained: bool = True, weights: str | Path | None = None) -> nn.Module:
    """The demo CNN in eval mode; ``pretrained`` (default True) loads the shipped weights
    (or ``weights``, default None = the shipped file). Input (B, 1, 8, 8), see the module docstring."""
    model = build_cnn()
    if pretrained or weights is not None:
        _load_state(model, weights or WEIGHTS_DIR / CNN_WEIGHTS)
    return model.eval()


def demo_meta() -> dict[str, Any]:
    """The training record shipped beside the weights (``weights/demo.json``): accuracy, split, seed, ..."""
    path = WEIGHTS_DIR / META_FILE
    if not path.is_file():
        raise HeartError(f"{path} not found: run 'python scripts/train_demo.py --out {WEIGHTS_DIR}'")
    return json.loads(path.read_text())


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` (batched, no grad)."""
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    return correct / max(len(x), 1)


DEMO_MODELS = {"demo-vit": demo_vit, "demo-cnn": demo_cnn}


def build_demo(name: str, pretrained: bool = True, weights: str | Path | None = None) -> nn.Module:
    """``build_demo("demo-vit" | "demo-cnn", pretrained=True, weights=None)``: by name, for the CLI."""
    key = name.lower().replace("_", "-")
    if key not in DEMO_MODELS:
        raise HeartError(f"unknown demo model {name!r}: choose from {', '.join(DEMO_MODELS)}")
    return DEMO_MODELS[key](pretrained=pretrained, weights=weights)
