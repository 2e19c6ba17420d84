"""TensorRT build precision and 2:4 sparsity, one place for both TensorRT paths (Polygraphy and trtexec).

    flags = BuildFlags.of("fp16", sparsity=True)              # HeartError for an unknown precision
    CreateConfig(**flags.polygraphy_config(), ...)             # runtime/trt.py
    cmd += flags.trtexec_args()                                # runtime/trtexec.py: ["--fp16", "--sparsity=enable"]

Precisions: ``fp32`` (TensorRT's default), ``fp16``, ``int8`` (on the Polygraphy path fp16 is enabled too, as
the fallback for layers without int8 kernels; trtexec gets ``--int8`` alone), ``best`` (trtexec only: every
precision). ``sparsity`` (default True): allow 2:4 structured-sparse kernels (Ampere and newer, Orin included)
for weights that have the pattern.
"""
from __future__ import annotations

from dataclasses import dataclass
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import HeartError

PRECISIONS = ("fp32", "fp16", "int8", "best")
POLYGRAPHY_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class BuildFlags:
    precision: str = "fp32"
    sparsity: bool = True

    @classmethod
    def of(cls, precision: str = "fp32", sparsity: bool = True, allowed: tuple[str, ...] = PRECISIONS) -> "BuildFlags":
        """Checked flags; ``allowed`` (default every precision) names what the caller's path supports."""
        if precision not in allowed:
            *head, last = allowed
            raise HeartError(f"unknown precision {precision!r}: use {', '.join(head)} or {last}")
        return cls(precision, bool(sparsity))

    @property
    def fp16(self) -> bool:
        return self.precision in ("fp16", "int8", "best")

    @property
    def int8(self) -> bool:
        return self.precision in ("int8", "best")

    def polygraphy_config(self) -> dict[str, Any]:
        """Keyword arguments of ``polygraphy.backend.trt.CreateConfig`` for these flags."""
        return {"fp16": self.fp16, "int8": self.int8, "sparse_weights": self.sparsity}

    def trtexec_args(self) -> list[str]:
        """trtexec build arguments for these flags."""
        args = [f"--{self.precision}"] if self.precision != "fp32" else []
        return args + (["--sparsity=enable"] if self.sparsity else [])


def init_engine_options(runner: Any, path: str | os.PathLike, precision: str, sparsity: bool,
                        engine_path: str | os.PathLike | None, timing_cache: str | os.PathLike | None,
                        shapes: Mapping[str, Any] | None, allowed: tuple[str, ...] = PRECISIONS) -> None:
    """Set the options both TensorRT runners share on ``runner``: ``flags`` (checked :class:`BuildFlags`),
    ``path``, ``precision``, ``sparsity``, ``engine_path`` and ``timing_cache`` (Paths or None), ``shapes`` (dict)."""
    runner.flags = BuildFlags.of(precision, sparsity, allowed=allowed)
    runner.path = Path(path)
    runner.precision = precision
    runner.sparsity = sparsity
    runner.engine_path = Path(engine_path) if engine_path else None
    runner.timing_cache = Path(timing_cache) if timing_cache else None
    runner.shapes = dict(shapes or {})
