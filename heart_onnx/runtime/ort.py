"""ONNX Runtime runner: CPU, CUDA and TensorRT execution providers.

    with OrtRunner("m.onnx", provider="trt", precision="fp16", cache_dir="trt_cache") as r: ...

Provider options used for TensorRT (ORT's TensorRT EP): ``trt_fp16_enable``, ``trt_int8_enable``,
``trt_engine_cache_enable`` + ``trt_engine_cache_path``, ``trt_timing_cache_enable`` (engine and
timing cache kept in ``cache_dir``), ``trt_sparsity_enable`` (2:4 sparse tensor cores on Ampere/Orin).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import HeartError, MissingDependency
from .base import Runner, TensorSpec

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "trt": "TensorrtExecutionProvider"}
_ONNX_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class OrtRunner(Runner):
    """ONNX Runtime session on ``provider`` (default "cpu"; "cuda", "trt").

    Options (defaults): ``precision="fp32"`` (fp16/int8 only with provider "trt"), ``threads=None``
    (ORT's default intra-op threads; pass 1 for stable timings on a shared CPU), ``cache_dir=None``
    (TensorRT engine and timing cache directory), ``sparsity=True`` (TensorRT EP 2:4 sparsity),
    ``graph_optimization="all"``, ``spinning=True`` (intra-op threads busy-wait between ops; pass False when
    two sessions alternate on the same cores, see :func:`heart_onnx.runtime.api.benchmark_pair`).
    """

    def __init__(self, path: str | os.PathLike | bytes, provider: str = "cpu", precision: str = "fp32", threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None, sparsity: bool = True, graph_optimization: str = "all",
                 spinning: bool = True):
        super().__init__()
        if provider not in _PROVIDERS:
            raise HeartError(f"unknown ONNX Runtime provider {provider!r}: use cpu, cuda or trt")
        if precision not in ("fp32", "fp16", "int8"):
            raise HeartError(f"unknown precision {precision!r}: use fp32, fp16 or int8")
        if precision != "fp32" and provider != "trt":
            raise HeartError(f"precision {precision} needs the TensorRT provider (--backend ort-trt) or --backend trt")
        self.path = path
        self.provider = provider
        self.backend = f"ort-{provider}"
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.precision = precision
        self.threads = threads
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.sparsity = sparsity
        self.graph_optimization = graph_optimization
        self.spinning = spinning
        self.session = None
        self._out_names: list[str] = []

    def provider_list(self) -> list:
        if self.provider == "cpu":
            return ["CPUExecutionProvider"]
        if self.provider == "cuda":
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        opts = {
            "trt_fp16_enable": self.precision in ("fp16", "int8"),
            "trt_int8_enable": self.precision == "int8",
            "trt_sparsity_enable": self.sparsity,
        }
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            opts.update({
                "trt_engine_cache_enable": True, "trt_engine_cache_path": str(self.cache_dir),
                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(self.cache_dir),
            })
        return [("TensorrtExecutionProvider", opts), "CUDAExecutionProvider", "CPUExecutionProvider"]

    def activate(self) -> None:
        import onnxruntime as ort

        wanted = _PROVIDERS[self.provider]
        if wanted not in ort.get_available_providers():
            raise MissingDependency(
                f"ONNX Runtime here has no {wanted} (available: {', '.join(ort.get_available_providers())}): "
                "pip install 'heart-onnx[gpu]' (onnxruntime-gpu; on Jetson the wheel from the Jetson Zoo)"
            )
        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
            so.inter_op_num_threads = 1
        if not self.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[self.graph_optimization]
        src = self.path if isinstance(self.path, bytes) else str(self.path)
        if not isinstance(self.path, bytes) and not Path(src).exists():
            raise HeartError(f"model file not found: {src}")
        self.session = ort.InferenceSession(src, sess_options=so, providers=self.provider_list())
        used = self.session.get_providers()
        if wanted not in used:
            raise HeartError(f"ONNX Runtime fell back to {used[0]} instead of {wanted}: check the CUDA/TensorRT install")
        self._out_names = [o.name for o in self.session.get_outputs()]

    def deactivate(self) -> None:
        self.session = None

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self._out_names, dict(feed))
        return dict(zip(self._out_names, outs))

    def run_raw(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs as a list (no dict building): for the tightest timing loops."""
        return self.session.run(self._out_names, feed)

    def input_specs(self) -> list[TensorSpec]:
        if self.session is None:
            import onnx

            m = onnx.load(str(self.path), load_external_data=False) if not isinstance(self.path, bytes) else onnx.load_from_string(self.path)
            from onnx import helper

            init = {i.name for i in m.graph.initializer}
            specs = []
            for i in m.graph.input:
                if i.name in init:
                    continue
                tt = i.type.tensor_type
                dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
                specs.append(TensorSpec(i.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
            return specs
        return [
            TensorSpec(i.name, tuple(d if isinstance(d, int) else d for d in i.shape), np.dtype(_ONNX_TYPES.get(i.type, np.float32)))
            for i in self.session.get_inputs()
        ]

    @property
    def output_names(self) -> list[str]:
        return list(self._out_names)
