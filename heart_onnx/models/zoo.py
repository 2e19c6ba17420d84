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


# ----------------------------------------------------------------------------------------- HF
@dataclass(frozen=True)
class PythiaConfig:
    """Published GPT-NeoX configuration of one Pythia size (EleutherAI, ``config.json`` on the Hub)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    params: int  # total parameters incl. both (untied) embeddings, as published


PYTHIA: dict[str, PythiaConfig] = {
    "70m": PythiaConfig(512, 6, 8, 2048, 70_426_624),
    "160m": PythiaConfig(768, 12, 12, 3072, 162_322_944),
    "410m": PythiaConfig(1024, 24, 16, 4096, 405_334_016),
    "1b": PythiaConfig(2048, 16, 8, 8192, 1_011_781_632),
    "1.4b": PythiaConfig(2048, 24, 16, 8192, 1_414_647_808),
}


def _gpt_neox(hidden: int, layers: int, heads: int, intermediate: int, vocab: int = 50304, max_pos: int = 2048) -> nn.Module:
    tf = require("transformers", "GPT-NeoX (Pythia) builders")
    cfg = tf.GPTNeoXConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
        rotary_pct=0.25, rotary_emb_base=10000, vocab_size=vocab, max_position_embeddings=max_pos,
        use_parallel_residual=True, hidden_act="gelu", layer_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )
    return tf.GPTNeoXForCausalLM(cfg).eval()


def pythia(size: str = "70m") -> nn.Module:
    """Random-init Pythia ``size`` (70m, 160m, 410m, 1b, 1.4b): rotary_pct 0.25, vocab 50304, 2048 positions,
    parallel residual, untied embeddings, eager attention."""
    key = str(size).lower().removeprefix("pythia-").removeprefix("pythia_")
    c = PYTHIA.get(key)
    if c is None:
        raise HeartError(f"unknown Pythia size {size!r}: choose one of {', '.join(PYTHIA)}")
    return _gpt_neox(c.hidden, c.layers, c.heads, c.intermediate)


def tiny_pythia(layers: int = 2, hidden: int = 32, heads: int = 4, intermediate: int = 64, vocab: int = 128,
                max_pos: int = 64) -> nn.Module:
    """A tiny GPT-NeoX for tests (defaults: 2 layers, hidden 32, 4 heads, ffn 64, vocab 128, 64 positions)."""
    return _gpt_neox(hidden, layers, heads, intermediate, vocab=vocab, max_pos=max_pos)


def tiny_bert(layers: int = 2, hidden: int = 32, heads: int = 4, intermediate: int = 64, vocab: int = 128,
              max_pos: int = 64, num_labels: int | None = 3) -> nn.Module:
    """A tiny BERT for tests: ``BertForSequenceClassification`` with ``num_labels`` (default 3) classes,
    or ``BertModel`` when ``num_labels=None`` (defaults: 2 layers, hidden 32, 4 heads, ffn 64, vocab 128)."""
    tf = require("transformers", "BERT builders")
    cfg = tf.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=max_pos, attn_implementation="eager",
        num_labels=num_labels or 2,
    )
    model = tf.BertModel(cfg) if num_labels is None else tf.BertForSequenceClassification(cfg)
    return model.eval()


def _hf_vit(deit: bool, layers: int, hidden: int, heads: int, intermediate: int, img: int, patch: int,
            num_labels: int, teacher: bool = False) -> nn.Module:
    tf = require("transformers", "HF ViT/DeiT builders")
    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
              image_size=img, patch_size=patch, num_labels=num_labels, attn_implementation="eager", qkv_bias=True)
    if deit:
        cfg = tf.DeiTConfig(**kw)
        cls = tf.DeiTForImageClassificationWithTeacher if teacher else tf.DeiTForImageClassification
        return cls(cfg).eval()
    return tf.ViTForImageClassification(tf.ViTConfig(**kw)).eval()


def tiny_hf_vit(layers: int = 2, hidden: int = 32, heads: int = 4, intermediate: int = 64, img: int = 32,
                patch: int = 8, num_labels: int = 10) -> nn.Module:
    """A tiny HF ``ViTForImageClassification`` (defaults: 2 layers, hidden 32, 4 heads, 32px, patch 8, 10 classes)."""
    return _hf_vit(False, layers, hidden, heads, intermediate, img, patch, num_labels)


def tiny_hf_deit(layers: int = 2, hidden: int = 32, heads: int = 4, intermediate: int = 64, img: int = 32,
                 patch: int = 8, num_labels: int = 10, teacher: bool = False) -> nn.Module:
    """A tiny HF ``DeiTForImageClassification`` (``teacher=True``: ``...WithTeacher``); 2 prefix tokens."""
    return _hf_vit(True, layers, hidden, heads, intermediate, img, patch, num_labels, teacher=teacher)


def hf_vit_b_16(num_labels: int = 1000) -> nn.Module:
    """HF ``ViTForImageClassification`` with the ViT-B/16 224px configuration (86.6M parameters)."""
    return _hf_vit(False, 12, 768, 12, 3072, 224, 16, num_labels)


# ----------------------------------------------------------------------------------------- CNN
class CifarBasicBlock(nn.Module):
    """ResNet-56's block (He et al. 2016, CIFAR): conv3x3-bn-relu-conv3x3-bn + shortcut, relu.

    Option A shortcut: on a stride/width change the identity is subsampled (``x[:, :, ::2, ::2]``)
    and zero-padded in channels (no parameters), as in the paper's CIFAR experiments.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x
        if self.stride != 1:
            sc = sc[:, :, :: self.stride, :: self.stride]
        if self.pad:
            sc = nn.functional.pad(sc, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.relu(out + sc)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): 3 stages of ``n`` BasicBlocks at widths ``w, 2w, 4w`` (default 16), 32x32 input."""

    def __init__(self, n: int = 9, num_classes: int = 10, width: int = 16, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        layers, c = [], width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(CifarBasicBlock(c, w, 2 if (j == 0 and i > 0) else 1))
                c = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 32, 32) -> (B, classes)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomize_bn(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (tests: folding is visible)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                if m.affine:
                    m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                    m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model


def _calibrate_bn(model: nn.Module, size: tuple[int, int, int], batches: int = 1, batch: int = 2, seed: int = 0) -> nn.Module:
    """Set every BatchNorm's running statistics from ``batches`` forwards of standard-normal images.

    Random init leaves running mean 0 / variance 1, so in eval mode nothing is normalised and a deep
    residual net's logits grow like 2^(blocks/2) (ResNet-56: ~1e4). Calibrated statistics keep
    activations O(1), as in a trained model, so sensitivities and output comparisons are meaningful.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    p = next(model.parameters())
    if not bns or p.device.type == "meta":  # meta: shapes only (parameter counts)
        return model
    g = torch.Generator(device="cpu").manual_seed(seed)
    moms = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, *size, generator=g).to(device=p.device, dtype=p.dtype))
    for m, mom in zip(bns, moms):
        m.momentum = mom
    return model.eval()


def _sized(model: nn.Module, size: tuple[int, int, int]) -> nn.Module:
    model.heart_onnx_input_shape = size  # (C, H, W): read by CNNAdapter and heart_onnx.data
    return model.eval()


def resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision ResNet-18, random init with calibrated BatchNorm statistics (11.7M parameters, 224px)."""
    tv = require("torchvision.models", "ResNet builders")
    return _sized(_calibrate_bn(tv.resnet18(weights=None, num_classes=num_classes), (3, 224, 224)), (3, 224, 224))


def resnet56(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-56 (9 BasicBlocks per stage, widths 16/32/64, option A shortcuts, 0.85M parameters, 32px),
    random init with calibrated BatchNorm statistics."""
    return _sized(_calibrate_bn(CifarResNet(9, num_classes), (3, 32, 32)), (3, 32, 32))


def mobilenetv2(num_classes: int = 1000, width_mult: float = 1.0) -> nn.Module:
    """torchvision MobileNetV2 (width 1.0: 3.5M parameters, 224px), random init with calibrated BatchNorm statistics."""
    tv = require("torchvision.models", "MobileNetV2 builders")
    model = tv.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    return _sized(_calibrate_bn(model, (3, 224, 224)), (3, 224, 224))


def tiny_resnet(kind: str = "cifar", num_classes: int = 10) -> nn.Module:
    """A tiny ResNet for tests with randomised BatchNorm statistics, 32px input.

    ``kind``: ``"cifar"`` (default; CIFAR ResNet-8, widths 8/16/32), ``"basic"`` (torchvision ResNet with
    one BasicBlock per stage) or ``"bottleneck"`` (torchvision ResNet with one Bottleneck per stage, width 16/group).
    """
    if kind == "cifar":
        return _sized(_randomize_bn(CifarResNet(1, num_classes, width=8)), (3, 32, 32))
    tvr = require("torchvision.models.resnet", "ResNet builders")
    if kind == "basic":
        m = tvr.ResNet(tvr.BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    elif kind == "bottleneck":
        m = tvr.ResNet(tvr.Bottleneck, [1, 1, 1, 1], num_classes=num_classes, width_per_group=16)
    else:
        raise HeartError(f"unknown tiny_resnet kind {kind!r}: use cifar, basic or bottleneck")
    return _sized(_randomize_bn(m), (3, 32, 32))


def tiny_mobilenetv2(num_classes: int = 10, source: str = "torchvision") -> nn.Module:
    """A tiny MobileNetV2 for tests (width 0.25, stages t,c,n,s = [1,16,1,1], [6,24,2,2], [6,32,1,2], [6,64,1,1];
    randomised BatchNorm statistics, 32px). ``source="timm"`` builds timm's ``mobilenetv2_035``-style net instead."""
    if source == "timm":
        timm = require("timm", "timm MobileNetV2")
        m = timm.create_model("mobilenetv2_035", pretrained=False, num_classes=num_classes)
        return _sized(_randomize_bn(m), (3, 32, 32))
    tvm = require("torchvision.models.mobilenetv2", "MobileNetV2 builders")
    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 1, 2], [6, 64, 1, 1]]
    m = tvm.MobileNetV2(num_classes=num_classes, width_mult=0.25, inverted_residual_setting=setting)
    return _sized(_randomize_bn(m), (3, 32, 32))


# ----------------------------------------------------------------------------------------- local files
def load_local(path: str | os.PathLike, family: str | None = None, **kw: Any) -> nn.Module:
    """Load a trained model from local files (nothing downloads), in eval mode, ready for second-order work.

    - a Hugging Face ``save_pretrained`` folder (has ``config.json``): the class named in
      ``config.architectures`` (or ``family``: a transformers class name such as ``"GPTNeoXForCausalLM"``),
      ``from_pretrained(path, local_files_only=True, attn_implementation="eager")``;
    - a state-dict file (``.pth``/``.pt``/``.bin``; a checkpoint dict with a ``"model"`` or ``"state_dict"``
      entry is unwrapped), read with ``torch.load(..., weights_only=True)``, loaded strictly into
      ``family``: a zoo name (``vit_b_16``, ``resnet56``, ...) or a timm architecture name
      (``vit_base_patch16_224``). ``family=None`` infers a timm ViT/DeiT from the tensor shapes
      (patch size, width, depth, classes, distillation token; 64-dim heads, as every published ViT/DeiT).
    ``kw`` go to the builder. Raises HeartError for a missing or unreadable path, or weights that do not fit.
    """
    p = Path(path)
    if not p.exists():
        raise HeartError(f"model path {p} does not exist: pass a save_pretrained folder or a state-dict file")
    if p.is_dir():
        return _load_hf(p, family)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, full pickled modules
        raise HeartError(f"cannot read {p} as a state dict ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): "
                         "save weights with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise HeartError(f"{p} does not hold a state dict of tensors: save weights with torch.save(model.state_dict(), path)")
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    if family is None:
        model = _infer_timm_vit(sd, p)
    elif family.strip().lower().replace("-", "_") in {k.replace("-", "_") for k in BUILDERS}:
        model = build(family, **kw)
    else:
        timm = require("timm", "loading a timm state dict")
        try:
            model = timm.create_model(family, pretrained=False, **kw)
        except Exception as exc:
            raise HeartError(f"unknown model family {family!r} ({exc}): use a zoo name ({', '.join(names())}) "
                             "or a timm architecture name") from None
        _unfuse(model)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise HeartError(f"weights in {p} do not fit {family or 'the inferred ViT'} ({' '.join(first[:2])[:300]}): "
                         "pass the right family=") from None
    return model.eval()


def _load_hf(p: Path, family: str | None) -> nn.Module:
    import json

    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise HeartError(f"{p} is a folder without config.json: pass a Hugging Face save_pretrained folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HeartError(f"{cfg_file} is not valid JSON ({exc})") from None
    tf = require("transformers", "loading Hugging Face models")
    arch = family or (cfg.get("architectures") or [None])[0]
    cls = getattr(tf, arch, None) if arch else None
    if cls is None:
        cls = tf.AutoModel
    try:
        model = cls.from_pretrained(str(p), local_files_only=True, attn_implementation="eager")
    except Exception as exc:
        raise HeartError(f"cannot load {p} with {getattr(cls, '__name__', cls)} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return model.eval()


def _infer_timm_vit(sd: dict[str, torch.Tensor], p: Path) -> nn.Module:
    need = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight")
    if not all(k in sd for k in need):
        raise HeartError(f"{p} is not a timm ViT state dict (no {', '.join(need)}): pass family= (a zoo or timm name)")
    pw = sd["patch_embed.proj.weight"]  # (D, C, P, P)
    dim, in_chans, patch = int(pw.shape[0]), int(pw.shape[1]), int(pw.shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    distilled = "dist_token" in sd
    prefix = 2 if distilled else (1 if "cls_token" in sd else 0)
    grid = round((int(sd["pos_embed"].shape[1]) - prefix) ** 0.5)
    num_classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
    mlp_ratio = int(sd["blocks.0.mlp.fc1.weight"].shape[0]) / dim
    heads = max(1, dim // 64)
    return _timm_vit(dim, depth, heads, img=grid * patch, patch=patch, num_classes=num_classes, distilled=distilled,
                     in_chans=in_chans, mlp_ratio=mlp_ratio)


# ----------------------------------------------------------------------------------------- registry
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vit_ti_16": vit_ti_16, "vit_s_16": vit_s_16, "vit_b_16": vit_b_16,
    "deit_ti_16": deit_ti_16, "deit_s_16": deit_s_16, "deit_b_16": deit_b_16,
    "tiny_vit": tiny_vit, "tiny_deit": tiny_deit,
    **{f"pythia-{k}": (lambda k=k: pythia(k)) for k in PYTHIA},
    "tiny_pythia": tiny_pythia, "tiny_bert": tiny_bert, "tiny_hf_vit": tiny_hf_vit, "tiny_hf_deit": tiny_hf_deit,
    "hf_vit_b_16": hf_vit_b_16,
    "resnet18": resnet18, "resnet56": resnet56, "mobilenetv2": mobilenetv2,
    "tiny_resnet": tiny_resnet, "tiny_mobilenetv2": tiny_mobilenetv2,
}


def names() -> list[str]:
    """Every name ``build`` accepts."""
    return sorted(BUILDERS)


def build(name: str, **kw: Any) -> nn.Module:
    """Build a random-init model by zoo name (``vit_b_16``, ``pythia-70m``, ``tiny_vit``, ...), in eval mode."""
    key = name.strip().lower().replace("/", "_")
    fn = BUILDERS.get(key) or BUILDERS.get(key.replace("-", "_")) or BUILDERS.get(key.replace("_", "-"))
    if fn is None:
        raise HeartError(f"unknown model {name!r}: choose one of {', '.join(names())} or load a local one with --model PATH")
    return fn(**kw).eval()
