"""``Sensitivities``: what ``analyze`` measured, in numpy only (no torch), saved as one ``.npz``.

All scores are *predicted increases of the per-input calibration loss* in nats (the loss named in
``meta["loss"]``, "kl" by default: KL(dense || pruned) of the predictive distribution), so they add up
against a loss budget.

Arrays (any may be ``None`` when the target was not analysed):

- ``head`` (L, H): mean over inputs of the predicted loss increase of removing each head alone;
- ``head_per_input`` (S, L, H): the same per calibration input;
- ``token_per_input`` (S, L, N): predicted loss increase of dropping token ``t`` after block ``l``
  (prefix tokens are ``nan``: they are never dropped);
- ``token_keep_curve`` (L, N+1): entry ``[l, K]`` is the predicted mean loss increase when the run-time
  scorer named ``meta["token_scorer"]`` keeps ``K`` tokens (prefix included) after block ``l``: per input,
  the sum of the token scores of the ``N-K`` tokens the scorer drops, averaged over inputs. ``K < P`` is
  ``nan``; ``[l, N] = 0``. ``token_keep_curves`` holds the same curve for every scorer (``cls_attention``,
  ``oracle`` = the Hessian order, ``linear`` = on held-out inputs) and, with the GGN estimator,
  ``<scorer>_group``: the whole group's second-order quadratic, cross terms included. Both under-predict
  large measured group drops on the demo ViT (see ``benchmarks/sensitivity_quality.py``): calibrate
  against measurements (``heart_onnx.budget.calibrate``) before trusting absolute nats.
- ``scorers`` {layer: (w (D,), b)}: fitted linear token scorers (see ``sensitivity/scorers.py``);
  ``scorer_quality``: JSON-able ranking quality of each scorer on held-out inputs;
- ``pairs``: weight sensitivities (``sensitivity/pairs.py`` fills it), name -> array.

The file is a plain ``.npz`` (``allow_pickle=False``) whose ``__meta__`` entry is the JSON of ``meta``,
``scorer_quality`` and the key layout; it is written atomically.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import HeartError
from .fileio import atomic_path

SENS_FORMAT = "heart-onnx-sensitivities"
SENS_VERSION = 1
_ARRAYS = ("head", "head_per_input", "token_per_input", "token_keep_curve")


@dataclass
class Sensitivities:
    """Scores from ``heart_onnx.analyze`` (see the module docstring for every field)."""

    meta: dict[str, Any] = field(default_factory=dict)  # family, fingerprint, geometry, method, loss, n_samples, probes, ...
    head: np.ndarray | None = None  # (L, H)
    head_per_input: np.ndarray | None = None  # (S, L, H)
    token_per_input: np.ndarray | None = None  # (S, L, N), prefix = nan
    token_keep_curve: np.ndarray | None = None  # (L, N+1)
    token_keep_curves: dict[str, np.ndarray] = field(default_factory=dict)  # scorer -> (L, N+1)
    scorers: dict[int, tuple[np.ndarray, float]] = field(default_factory=dict)  # layer -> (w (D,), b)
    scorer_quality: dict[str, Any] = field(default_factory=dict)
    pairs: dict[str, np.ndarray] = field(default_factory=dict)  # engineer E: name -> array

    # ------------------------------------------------------------------ convenience
    @property
    def num_layers(self) -> int:
        return int(self.meta.get("geometry", {}).get("layers", 0))

    @property
    def prefix_tokens(self) -> int:
        return int(self.meta.get("geometry", {}).get("prefix_tokens", 0) or 0)

    def predicted_heads(self, removed: Mapping[int, Any]) -> float:
        """Predicted mean loss increase of removing ``{layer: [head, ...]}`` (sum of single-head scores)."""
        if self.head is None:
            raise HeartError("these sensitivities have no head scores: run 'heart-onnx analyze' with --targets heads")
        return float(sum(self.head[int(l), int(h)] for l, hs in removed.items() for h in hs))

    def predicted_tokens(self, stages: Mapping[int, int] | Any) -> float:
        """Predicted mean loss increase of token stages ``{after_layer: keep}`` (or TokenStage objects)."""
        if self.token_keep_curve is None:
            raise HeartError("these sensitivities have no token scores: run 'heart-onnx analyze' with --targets tokens")
        items = stages.items() if isinstance(stages, Mapping) else [(s.after_layer, s.keep) for s in stages]
        return float(sum(self.token_keep_curve[int(l), int(k)] for l, k in items))

    def summary(self) -> dict[str, Any]:
        """A small JSON-able description (for ``--json`` and notebooks)."""
        out: dict[str, Any] = {"meta": self.meta}
        for name in _ARRAYS:
            a = getattr(self, name)
            if a is not None:
                out[name + "_shape"] = list(a.shape)
        if self.head is not None:
            flat = np.argsort(self.head, axis=None)
            L, H = self.head.shape
            out["least_sensitive_heads"] = [[int(i // H), int(i % H), float(self.head.flat[i])] for i in flat[:5]]
            out["most_sensitive_heads"] = [[int(i // H), int(i % H), float(self.head.flat[i])] for i in flat[::-1][:5]]
        if self.scorer_quality:
            out["scorer_quality"] = self.scorer_quality
        if self.pairs:
            out["pairs"] = sorted(self.pairs)[:20]
        return out

    # ------------------------------------------------------------------ file
    def to_arrays(self) -> dict[str, np.ndarray]:
        arrs: dict[str, np.ndarray] = {}
        for name in _ARRAYS:
            a = getattr(self, name)
            if a is not None:
                arrs[name] = np.asarray(a)
        for k, a in self.token_keep_curves.items():
            arrs[f"token_keep_curves/{k}"] = np.asarray(a)
        for l, (w, b) in self.scorers.items():
            arrs[f"scorers/{int(l)}/w"] = np.asarray(w, dtype=np.float32)
            arrs[f"scorers/{int(l)}/b"] = np.asarray(b, dtype=np.float32)
        for k, a in self.pairs.items():
            arrs[f"pairs/{k}"] = np.asarray(a)
        for k, a in arrs.items():
            if a.dtype == object:
                raise HeartError(f"sensitivity array {k} has dtype object: store numeric arrays only")
        return arrs

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.npz``, atomically, no pickles)."""
        path = Path(path)
        arrs = self.to_arrays()
        head = {"format": SENS_FORMAT, "version": SENS_VERSION, "meta": self.meta, "scorer_quality": self.scorer_quality}
        arrs["__meta__"] = np.array(json.dumps(head, default=_json_default))
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrs)
        with atomic_path(path, suffix=".npz") as tmp:
            tmp.write_bytes(buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Sensitivities":
        path = Path(path)
        if not path.is_file():
            raise HeartError(f"sensitivity file {path} does not exist: make one with 'heart-onnx analyze'")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrs = {k: z[k] for k in z.files}
        except (ValueError, OSError) as exc:
            raise HeartError(f"{path} is not a sensitivity .npz file ({exc}): make one with 'heart-onnx analyze'") from None
        if "__meta__" not in arrs:
            raise HeartError(f"{path} has no heart-onnx metadata: make it with 'heart-onnx analyze'")
        head = json.loads(str(arrs.pop("__meta__")))
        if head.get("format") != SENS_FORMAT:
            raise HeartError(f"{path} is not a heart-onnx sensitivity file")
        if head.get("version") != SENS_VERSION:
            raise HeartError(f"{path} has sensitivity format version {head.get('version')}; this heart-onnx reads {SENS_VERSION}")
        s = cls(meta=head.get("meta", {}), scorer_quality=head.get("scorer_quality", {}))
        scor: dict[int, dict[str, np.ndarray]] = {}
        for k, a in arrs.items():
            if k in _ARRAYS:
                setattr(s, k, a)
            elif k.startswith("token_keep_curves/"):
                s.token_keep_curves[k.split("/", 1)[1]] = a
            elif k.startswith("scorers/"):
                _, l, part = k.split("/")
                scor.setdefault(int(l), {})[part] = a
            elif k.startswith("pairs/"):
                s.pairs[k.split("/", 1)[1]] = a
        s.scorers = {l: (d["w"], float(d["b"])) for l, d in sorted(scor.items())}
        return s

    def plan_scorers(self) -> dict[int, tuple[tuple[float, ...], float]]:
        """The linear scorers in ``Plan.scorers`` form ``{layer: ((w...), b)}``."""
        return {int(l): (tuple(float(x) for x in w), float(b)) for l, (w, b) in self.scorers.items()}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
