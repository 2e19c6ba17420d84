"""TensorRT through Polygraphy: fp32/fp16/int8 engines, 2:4 sparsity, timing cache, engine saved.

    with TrtRunner("m.onnx", precision="fp16", engine_path="m.fp16.engine",
                   timing_cache="trt.cache", shapes={"pixel_values": (1, 3, 224, 224)}) as r:
        outs = r.infer(feed)

Entering builds the engine (or loads ``engine_path`` when it exists and ``rebuild`` is False),
saves it to ``engine_path``, and updates ``timing_cache`` so later builds are fast. int8 needs
calibration batches (``calib_batches``: an iterable of feed dicts) unless the graph carries Q/DQ
nodes. Requires ``tensorrt`` (``pip install 'heart-onnx[trt]'``, preinstalled by JetPack).
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

import numpy as np

from .._deps import require
from ..errors import HeartError
from .base import Runner, TensorSpec
from .trt_flags import POLYGRAPHY_PRECISIONS, init_engine_options


class TrtRunner(Runner):
    """Options (defaults): ``precision="fp32"`` (fp16, int8), ``sparsity=True`` (2:4 sparse weights
    allowed), ``engine_path=None`` (where the engine is saved/loaded), ``timing_cache=None``,
    ``shapes=None`` ({input: shape} for dynamic inputs: min = opt = max), ``calib_batches=None``,
    ``calib_cache=None``, ``workspace_mb=None``, ``rebuild=False``, ``profiles=None`` ({input: (min, opt, max)}
    shapes for inputs whose size changes between calls, e.g. a growing KV cache)."""

    backend = "trt"
    device = "cuda"

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", sparsity: bool = True,
                 engine_path: str | os.PathLike | None = None, timing_cache: str | os.PathLike | None = None,
                 shapes: Mapping[str, tuple] | None = None, calib_batches: Iterable[Mapping[str, np.ndarray]] | None = None,
                 calib_cache: str | os.PathLike | None = None, workspace_mb: int | None = None, rebuild: bool = False,
                 profiles: Mapping[str, tuple[tuple, tuple, tuple]] | None = None):
        super().__init__()
        init_engine_options(self, path, precision, sparsity, engine_path, timing_cache, shapes, POLYGRAPHY_PRECISIONS)
        self.calib_batches = calib_batches
        self.calib_cache = calib_cache
        self.workspace_mb = workspace_mb
        self.rebuild = rebuild
        self.profiles = dict(profiles or {})
        self._runner = None
        self.build_info: dict = {}

    def _config(self):
        trt = require("tensorrt", "the TensorRT backend")
        from polygraphy.backend.trt import Calibrator, CreateConfig, Profile

        profiles = None
        if self.shapes or self.profiles:
            p = Profile()
            for name, shape in self.shapes.items():
                p.add(name, min=shape, opt=shape, max=shape)
            for name, (lo, opt, hi) in self.profiles.items():
                p.add(name, min=lo, opt=opt, max=hi)
            profiles = [p]
        calibrator = None
        if self.precision == "int8" and self.calib_batches is not None:
            calibrator = Calibrator(data_loader=self.calib_batches, cache=str(self.calib_cache) if self.calib_cache else None)
        pools = {trt.MemoryPoolType.WORKSPACE: self.workspace_mb << 20} if self.workspace_mb else None
        return CreateConfig(
            **self.flags.polygraphy_config(), profiles=profiles, calibrator=calibrator, memory_pool_limits=pools,
            load_timing_cache=str(self.timing_cache) if self.timing_cache and self.timing_cache.exists() else None,
        )

    def activate(self) -> None:
        require("tensorrt", "the TensorRT backend")
        from polygraphy.backend.trt import EngineFromNetwork, EngineFromPath, NetworkFromOnnxPath, SaveEngine
        from polygraphy.backend.trt import TrtRunner as _PgRunner

        if not self.path.exists():
            raise HeartError(f"model file not found: {self.path}")
        if self.engine_path and self.engine_path.exists() and not self.rebuild:
            engine = EngineFromPath(str(self.engine_path))
            self.build_info = {"engine": str(self.engine_path), "loaded": True}
        else:
            try:
                engine = EngineFromNetwork(
                    NetworkFromOnnxPath(str(self.path)), config=self._config(),
                    save_timing_cache=str(self.timing_cache) if self.timing_cache else None,
                )
                if self.engine_path:
                    self.engine_path.parent.mkdir(parents=True, exist_ok=True)
                    engine = SaveEngine(engine, path=str(self.engine_path))
            except Exception as exc:  # noqa: BLE001 - polygraphy raises PolygraphyException on build errors
                raise HeartError(f"TensorRT engine build failed for {self.path}: {exc}") from exc
            self.build_info = {"engine": str(self.engine_path) if self.engine_path else None, "loaded": False}
        self._runner = _PgRunner(engine)
        try:
            self._runner.activate()
        except Exception as exc:  # noqa: BLE001
            self._runner = None
            raise HeartError(f"TensorRT engine build/load failed for {self.path}: {exc}") from exc

    def deactivate(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._runner.infer(feed_dict=dict(feed), copy_outputs_to_host=True)
        return {k: np.asarray(v) for k, v in outs.items()}

    def sync(self) -> None:  # polygraphy's infer already synchronises its stream
        return None

    def input_specs(self) -> list[TensorSpec]:
        if self._runner is not None:
            meta = self._runner.get_input_metadata()
            return [TensorSpec(n, tuple(m.shape), np.dtype(m.dtype)) for n, m in meta.items()]
        from .ort import OrtRunner

        return OrtRunner(self.path).input_specs()
