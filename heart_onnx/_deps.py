"""Lazy imports of optional heavy dependencies, failing with the extra to install."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependency

# module name -> (extra, pip name)
_EXTRAS = {
    "timm": ("timm", "timm"),
    "torchvision": ("timm", "torchvision"),
    "transformers": ("hf", "transformers"),
    "ipywidgets": ("jupyter", "ipywidgets"),
    "jupyter_server": ("jupyter", "jupyter_server"),
    "nbclient": ("jupyter", "nbclient"),
    "nbformat": ("jupyter", "nbformat"),
    "tensorrt": ("trt", "tensorrt"),
    "jtop": ("jetson", "jetson-stats"),
    "pynvml": ("nvml", "nvidia-ml-py"),
    "playwright": ("dev", "playwright"),
}


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise MissingDependency naming the extra, e.g. ``pip install heart-onnx[timm]``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra, pip_name = _EXTRAS.get(module.split(".")[0], (None, module.split(".")[0]))
        why = f" (needed for {purpose})" if purpose else ""
        hint = f"pip install 'heart-onnx[{extra}]'" if extra else f"pip install {pip_name}"
        raise MissingDependency(f"{module} is not installed{why}: run {hint}") from exc


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
