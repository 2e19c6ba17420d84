"""``adapt(model)``: find the adapter for a model's family.

Detection is by the classes in the model's MRO (module and name), so transformers and timm are only
imported when the model is one of theirs. Order matters: the first match wins.

| family     | classes                                                                     | adapter          |
|------------|-----------------------------------------------------------------------------|------------------|
| `vit`      | timm `VisionTransformer` (ViT, DeiT, `VisionTransformerDistilled`)          | `TimmViTAdapter` |
| `vit`      | HF `ViTForImageClassification`, `ViTModel`, `DeiTForImageClassification(WithTeacher)`, `DeiTModel` | `HFViTAdapter` |
| `gpt_neox` | HF `GPTNeoXForCausalLM`, `GPTNeoXModel` (Pythia)                             | `GPTNeoXAdapter` |
| `bert`     | HF `BertModel`, `BertForSequenceClassification` (and BERT-like: RoBERTa, ...) | `BertAdapter`    |
| `cnn`      | anything with torchvision/timm residual blocks or MobileNetV2 inverted residuals, or the zoo's CIFAR ResNet | `CNNAdapter` |
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from ..errors import HeartError
from .base import ModelAdapter


def _mro(model: nn.Module) -> list[tuple[str, str]]:
    return [(c.__module__, c.__name__) for c in type(model).__mro__]


def _has(model: nn.Module, module_prefix: str, names: tuple[str, ...]) -> bool:
    return any(m.startswith(module_prefix) and n in names for m, n in _mro(model))


def _is_timm_vit(model: nn.Module) -> bool:
    return _has(model, "timm.", ("VisionTransformer",))


def _is_hf_vit(model: nn.Module) -> bool:
    return _has(model, "transformers.", (
        "ViTForImageClassification", "ViTModel", "DeiTForImageClassification",
        "DeiTForImageClassificationWithTeacher", "DeiTModel",
    ))


def _is_gpt_neox(model: nn.Module) -> bool:
    return _has(model, "transformers.", ("GPTNeoXForCausalLM", "GPTNeoXModel"))


def _is_bert(model: nn.Module) -> bool:
    from .bert import is_bert_like

    return type(model).__module__.startswith("transformers.") and is_bert_like(model)


def _is_cnn(model: nn.Module) -> bool:
    from .cnn import is_supported_cnn

    return is_supported_cnn(model)


# (detector, "module:Adapter")
_FAMILIES: list[tuple[Callable[[nn.Module], bool], str]] = [
    (_is_timm_vit, "heart_onnx.models.vit_timm:TimmViTAdapter"),
    (_is_hf_vit, "heart_onnx.models.vit_hf:HFViTAdapter"),
    (_is_gpt_neox, "heart_onnx.models.gpt_neox:GPTNeoXAdapter"),
    (_is_bert, "heart_onnx.models.bert:BertAdapter"),
    (_is_cnn, "heart_onnx.models.cnn:CNNAdapter"),
]

FAMILIES = ("vit", "gpt_neox", "bert", "cnn")


def adapter_class(model: nn.Module) -> type[ModelAdapter] | None:
    """The adapter class for ``model``, or None when no family matches."""
    for detect, target in _FAMILIES:
        try:
            ok = detect(model)
        except ImportError:
            ok = False
        if ok:
            mod, name = target.split(":")
            return getattr(importlib.import_module(mod), name)
    return None


def adapt(model: nn.Module | ModelAdapter) -> ModelAdapter:
    """Wrap ``model`` in its family's adapter (an adapter is returned unchanged).

    Raises HeartError for an unsupported model, naming the supported families.
    """
    if isinstance(model, ModelAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise HeartError(f"expected a torch.nn.Module, got {type(model).__name__}")
    cls = adapter_class(model)
    if cls is None:
        raise HeartError(
            f"unsupported model {type(model).__module__}.{type(model).__name__}: heart-onnx supports timm/HF ViT and "
            "DeiT, HF GPT-NeoX (Pythia), HF BERT-like encoders and ResNet/MobileNetV2 conv nets "
            "(see heart_onnx.models.registry)"
        )
    return cls(model)
