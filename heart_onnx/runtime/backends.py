"""Backend names -> runners. One vocabulary for the CLI, the benchmark API and the sweep.

=============  =====================================================  ==========================
backend        runner                                                 needs
=============  =====================================================  ==========================
ort-cpu        ONNX Runtime, CPUExecutionProvider                     onnxruntime
ort-cuda       ONNX Runtime, CUDAExecutionProvider                    onnxruntime-gpu
ort-trt        ONNX Runtime, TensorrtExecutionProvider (fp32/16/int8) onnxruntime-gpu + TensorRT
trt            TensorRT engine built by Polygraphy                    tensorrt
trtexec        ``trtexec`` subprocess (timing only)                   TensorRT's trtexec
torch-cpu/cuda PyTorch eager (LLM generation, reference)              torch
=============  =====================================================  ==========================
"""
from __future__ import annotations

import os

from ..errors import HeartError
from .base import Runner

ONNX_BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "trt")
ALL_BACKENDS = (*ONNX_BACKENDS, "trtexec", "torch-cpu", "torch-cuda")


def make_runner(path: str | os.PathLike, backend: str = "ort-cpu", precision: str = "fp32", threads: int | None = None,
                cache_dir: str | os.PathLike | None = None, shapes: dict | None = None, **kw) -> Runner:
    """A runner for an ONNX file (not entered). ``cache_dir`` keeps TensorRT engines and timing caches."""
    if backend.startswith("ort-"):
        from .ort import OrtRunner

        return OrtRunner(path, provider=backend[4:], precision=precision, threads=threads, cache_dir=cache_dir, **kw)
    if backend == "trt":
        from pathlib import Path

        from .trt import TrtRunner

        engine = timing = None
        if cache_dir:
            stem = Path(path).stem
            engine = Path(cache_dir) / f"{stem}.{precision}.engine"
            timing = Path(cache_dir) / "timing.cache"
        return TrtRunner(path, precision=precision, engine_path=engine, timing_cache=timing, shapes=shapes, **kw)
    if backend == "trtexec":
        raise HeartError("trtexec is a timing tool, not a runner: use heart_onnx.runtime.trtexec.TrtexecRunner(...).run()")
    raise HeartError(f"unknown backend {backend!r} for an ONNX model: use one of {', '.join(ONNX_BACKENDS)} or trtexec")
