"""Random feeds for a model's inputs: the batch dimension set, every other dimension known.

Dynamic dimensions other than the first are resolved from ``shapes`` ({input: shape}) or
``dims`` ({dim_param: size}, e.g. {"sequence": 128}); otherwise a HeartError says which to pass.
Integer inputs get values in ``[0, int_high)`` (token ids; default 100), masks (names containing
"mask") get ones, floats are standard normal.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import HeartError
from .base import TensorSpec


def resolve_shape(spec: TensorSpec, batch: int, shapes: Mapping[str, Sequence[int]] | None = None,
                  dims: Mapping[str, int] | None = None) -> tuple[int, ...]:
    if shapes and spec.name in shapes:
        return tuple(int(d) for d in shapes[spec.name])
    out = []
    for i, d in enumerate(spec.shape):
        if isinstance(d, int) and d > 0:
            if i == 0 and batch and d != batch:
                raise HeartError(f"input {spec.name!r} has a static batch of {d}: use --batch {d} or export with a dynamic batch")
            out.append(d)
        elif i == 0:
            out.append(batch)
        elif dims and isinstance(d, str) and d in dims:
            out.append(int(dims[d]))
        else:
            raise HeartError(f"input {spec.name!r} has a dynamic dimension {i} ({d!r}): pass --shape {spec.name}:"
                             + "x".join(str(x) if isinstance(x, int) and x > 0 else "N" for x in spec.shape))
    return tuple(out)


def random_feed(specs: Sequence[TensorSpec], batch: int = 1, shapes: Mapping[str, Sequence[int]] | None = None,
                dims: Mapping[str, int] | None = None, seed: int = 0, int_high: int = 100) -> dict[str, np.ndarray]:
    """Random inputs for ``specs`` (defaults: batch 1, seed 0, token ids below 100)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for s in specs:
        shape = resolve_shape(s, batch, shapes, dims)
        dt = np.dtype(s.dtype)
        if dt.kind == "b":
            feed[s.name] = np.ones(shape, dtype=dt)
        elif dt.kind in "iu":
            feed[s.name] = np.ones(shape, dtype=dt) if "mask" in s.name.lower() else rng.integers(0, int_high, shape).astype(dt)
        else:
            feed[s.name] = rng.standard_normal(shape).astype(dt)
    return feed


def parse_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """``["pixel_values:1x3x224x224", ...]`` -> {"pixel_values": (1, 3, 224, 224)}."""
    out = {}
    for it in items or ():
        name, _, dims = it.rpartition(":")
        if not name or not dims:
            raise HeartError(f"bad --shape {it!r}: use NAME:1x3x224x224")
        try:
            out[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError as exc:
            raise HeartError(f"bad --shape {it!r}: dimensions must be integers, e.g. NAME:1x3x224x224") from exc
    return out
