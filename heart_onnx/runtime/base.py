"""The runner interface: a context manager that touches the device only when entered.

    with OrtRunner("model.onnx", provider="cpu") as r:     # session created here, not before
        outs = r.infer({"pixel_values": x})                # {output name: np.ndarray}

Constructing a runner is cheap and never fails for a missing device; entering it does the work
(session creation, engine build, model transfer) and raises a clear error if that is impossible.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..errors import HeartError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or str/None for dynamic dims
    dtype: np.dtype


class Runner(ABC):
    backend: str = "?"  # "ort-cpu", "ort-cuda", "ort-trt", "trt", "torch-cpu", ...
    device: str = "cpu"
    precision: str = "fp32"

    def __init__(self) -> None:
        self._active = False

    @property
    def is_active(self) -> bool:
        return self._active

    def __enter__(self) -> "Runner":
        self.activate()
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.deactivate()
        finally:
            self._active = False

    @abstractmethod
    def activate(self) -> None: ...

    def deactivate(self) -> None: ...

    @abstractmethod
    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._active:
            raise HeartError(f"{type(self).__name__} is not active: use it inside 'with runner:'")
        return self._infer(feed)

    def sync(self) -> None:
        """Wait for queued device work (no-op for synchronous backends)."""

    @abstractmethod
    def input_specs(self) -> list[TensorSpec]: ...

    def describe(self) -> dict:
        return {"backend": self.backend, "device": self.device, "precision": self.precision}
