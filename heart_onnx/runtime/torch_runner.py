"""PyTorch eager runner (CPU or CUDA): the reference backend, and the LLM generation backend.

    with TorchRunner(model, device="cuda", precision="fp16") as r:   # moved to the device here
        outs = r.infer({"input_ids": ids})
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from ..errors import HeartError
from .base import Runner, TensorSpec

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TorchRunner(Runner):
    """Options (defaults): ``device="cpu"`` ("cuda", "cuda:1"), ``precision="fp32"`` (fp16, bf16),
    ``threads=None`` (torch.set_num_threads when given). ``model`` may be a module or a zero-argument
    factory (called on entering, so nothing is built before it is needed)."""

    def __init__(self, model, device: str = "cpu", precision: str = "fp32", threads: int | None = None,
                 input_specs: list[TensorSpec] | None = None):
        super().__init__()
        if precision not in _DTYPES:
            raise HeartError(f"unknown precision {precision!r} for PyTorch: use fp32, fp16 or bf16")
        self._model_or_factory = model
        self.model = None
        self.device = device
        self.backend = "torch-cuda" if device.startswith("cuda") else "torch-cpu"
        self.precision = precision
        self.threads = threads
        self._specs = input_specs or []

    def activate(self) -> None:
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise HeartError("PyTorch sees no CUDA device: use --backend torch-cpu or install a CUDA build of torch")
        if self.threads:
            torch.set_num_threads(int(self.threads))
        m = self._model_or_factory
        if isinstance(m, Callable) and not isinstance(m, torch.nn.Module):
            m = m()
        self.model = m.to(self.device, dtype=getattr(torch, _DTYPES[self.precision])).eval()

    def deactivate(self) -> None:
        self.model = None
        try:
            import torch

            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

    def to_device(self, feed: Mapping[str, np.ndarray]) -> dict:
        import torch

        dt = getattr(torch, _DTYPES[self.precision])
        out = {}
        for k, v in feed.items():
            t = torch.as_tensor(np.asarray(v)).to(self.device)
            out[k] = t.to(dt) if t.is_floating_point() else t
        return out

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.model(**self.to_device(feed))
        if hasattr(out, "logits"):
            out = {"logits": out.logits}
        elif isinstance(out, torch.Tensor):
            out = {"output0": out}
        elif isinstance(out, (tuple, list)):
            out = {f"output{i}": o for i, o in enumerate(out) if isinstance(o, torch.Tensor)}
        return {k: v.float().cpu().numpy() for k, v in dict(out).items() if isinstance(v, torch.Tensor)}

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)

    def input_specs(self) -> list[TensorSpec]:
        return list(self._specs)
