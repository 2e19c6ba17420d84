"""The Plan: what to prune, as a frozen dataclass that round-trips through versioned JSON.

A plan is computed for one model and carries its fingerprint, so applying it to another model is a
clear error. Weight-pair merges can be large, so their index arrays live in a sidecar ``.npz``
(never a pickle) next to the JSON, referenced by name and SHA-256.

The token rule (implemented identically by the masked PyTorch reference and by ONNX surgery)
-----------------------------------------------------------------------------------------------
At a stage ``TokenStage(after_layer=l, keep=K)``, on the output ``x`` (B, N, D) of block ``l``, with
``P = plan.prefix_tokens`` prefix tokens (class/distillation) that are always kept:

1. scores ``s`` (B, N-P) for the non-prefix tokens:
   - ``"cls_attention"``: ``A`` = attention probabilities of block ``l`` (B, H, N, N), kept heads only;
     ``s = mean over kept heads of A[:, h, 0, P:]`` (what the class token attends to, EViT-style);
   - ``"linear"``: ``s = x[:, P:, :] @ w + b`` with ``plan.scorers[l] = (w (D,), b)`` (one MatMul).
2. ``idx = TopK(s, K-P, largest=True, sorted=True)``; the new sequence is
   ``concat(x[:, :P], gather(x[:, P:], idx))``: prefix first, then kept tokens in descending score.
3. if ``plan.fuse_dropped``: one more token is appended, the score-weighted mean of the dropped
   tokens (the N-K non-prefix tokens not in ``idx``): weights ``s_i / sum(s_dropped)`` for
   ``cls_attention`` (probabilities, positive) and ``softmax(s_dropped)`` for ``linear``.
   The sequence then has K+1 tokens; the fused token is an ordinary non-prefix token later on.

Weight merges (CAMP-HiVe pair merging), on weights in PyTorch layout ``(out, in[, kh, kw])``
--------------------------------------------------------------------------------------------
- ``unstructured`` and ``2:4``: ``W.flat[partner] += coef * W.flat[pruned]`` (using the original
  values, accumulated with ``np.add.at``), then ``W.flat[pruned] = 0``. Partners are never pruned.
- ``channel``: ``pruned``/``partner`` are output channels of ``weight`` (the producer).
  The consumer's input columns merge: ``C[:, partner] += coef * C[:, pruned]``, then
  ``C[:, pruned] = 0``; the producer's rows ``pruned`` (and its bias and any BatchNorm channels in
  between) become dead, so surgery removes them and the layer shrinks. The masked reference zeroes
  them instead; both compute the same function because the consumer no longer reads them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from .errors import HeartError, PlanMismatch
from .fileio import atomic_path

PLAN_VERSION = 1
Granularity = Literal["unstructured", "2:4", "channel"]
Scorer = Literal["cls_attention", "linear"]


@dataclass(frozen=True)
class TokenStage:
    """Keep ``keep`` tokens (prefix tokens included) on the output of block ``after_layer``."""

    after_layer: int
    keep: int


@dataclass(frozen=True, eq=False)
class WeightMerge:
    """Pair merges for one weight tensor (see the module docstring for the exact rule)."""

    weight: str  # adapter name of the weight, e.g. "blocks.0.mlp.fc1.weight"
    weight_sha: str  # sha256 of the original weight (float32, C order, PyTorch layout)
    shape: tuple[int, ...]
    granularity: Granularity
    pruned: np.ndarray  # int64: flat indices (unstructured, 2:4) or output channels (channel)
    partner: np.ndarray  # int64, same length
    coef: np.ndarray  # float32, same length
    consumer: str | None = None  # channel mode: the consuming weight's name
    consumer_sha: str | None = None
    consumer_shape: tuple[int, ...] | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeightMerge):
            return NotImplemented
        return (
            self.weight == other.weight and self.weight_sha == other.weight_sha and tuple(self.shape) == tuple(other.shape)
            and self.granularity == other.granularity and self.consumer == other.consumer
            and self.consumer_sha == other.consumer_sha
            and np.array_equal(self.pruned, other.pruned) and np.array_equal(self.partner, other.partner)
            and np.array_equal(self.coef, other.coef)
        )


@dataclass(frozen=True)
class Plan:
    """What to prune. Layers are 0-based block indices; heads use ``{layer: [head, ...]}`` (removed)."""

    fingerprint: str  # model fingerprint (see heart_onnx.models.fingerprint)
    family: str  # adapter family: "vit", "gpt_neox", "bert", "cnn"
    geometry: Mapping[str, Any]  # layers, heads, head_dim, hidden, seq_len, ... as the adapter reports
    heads: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    tokens: tuple[TokenStage, ...] = ()
    token_scorer: Scorer = "cls_attention"
    scorers: Mapping[int, tuple[tuple[float, ...], float]] = field(default_factory=dict)  # linear scorer per layer
    fuse_dropped: bool = False
    prefix_tokens: int = 1
    merges: tuple[WeightMerge, ...] = ()
    anchors: Mapping[str, str] = field(default_factory=dict)  # weight name -> sha256, to find layers in ONNX
    budget: float | None = None  # nats of mean calibration loss
    predicted_loss_change: float | None = None
    flops_dense: float | None = None
    flops_pruned: float | None = None
    notes: Mapping[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    # ------------------------------------------------------------------ queries
    @property
    def is_empty(self) -> bool:
        return not any(self.heads.values()) and not self.tokens and not self.merges

    def removed_heads(self, layer: int) -> tuple[int, ...]:
        return tuple(self.heads.get(layer, ()))

    def kept_heads(self, layer: int, num_heads: int) -> tuple[int, ...]:
        gone = set(self.removed_heads(layer))
        return tuple(h for h in range(num_heads) if h not in gone)

    def check_model(self, fingerprint: str) -> None:
        """Raise PlanMismatch unless this plan was computed for the model with ``fingerprint``."""
        if fingerprint != self.fingerprint:
            raise PlanMismatch(
                f"this plan was made for another model (fingerprint {self.fingerprint[:12]}, "
                f"model is {fingerprint[:12]}): re-run 'heart-onnx analyze' and 'heart-onnx plan' on this model"
            )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": "heart-onnx-plan",
            "version": self.version,
            "fingerprint": self.fingerprint,
            "family": self.family,
            "geometry": dict(self.geometry),
            "heads": {str(k): sorted(int(h) for h in v) for k, v in sorted(self.heads.items()) if len(v)},
            "tokens": [{"after_layer": t.after_layer, "keep": t.keep} for t in self.tokens],
            "token_scorer": self.token_scorer,
            "scorers": {str(k): {"weight": list(map(float, w)), "bias": float(b)} for k, (w, b) in sorted(self.scorers.items())},
            "fuse_dropped": self.fuse_dropped,
            "prefix_tokens": self.prefix_tokens,
            "merges": [
                {
                    "weight": m.weight, "weight_sha": m.weight_sha, "shape": list(m.shape), "granularity": m.granularity,
                    "consumer": m.consumer, "consumer_sha": m.consumer_sha,
                    "consumer_shape": list(m.consumer_shape) if m.consumer_shape is not None else None,
                    "count": int(len(m.pruned)),
                }
                for m in self.merges
            ],
            "anchors": dict(self.anchors),
            "budget": self.budget,
            "predicted_loss_change": self.predicted_loss_change,
            "flops_dense": self.flops_dense,
            "flops_pruned": self.flops_pruned,
            "notes": dict(self.notes),
        }
        return d

    def to_json(self) -> str:
        """JSON of everything but the merge arrays (see :meth:`save` for the sidecar)."""
        return json.dumps(self.to_dict(), indent=1)

    def merge_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i, m in enumerate(self.merges):
            out[f"{i}.pruned"] = np.asarray(m.pruned, dtype=np.int64)
            out[f"{i}.partner"] = np.asarray(m.partner, dtype=np.int64)
            out[f"{i}.coef"] = np.asarray(m.coef, dtype=np.float32)
        return out

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (JSON) and, if there are merges, ``<stem>.pairs.npz`` beside it, atomically."""
        path = Path(path)
        d = self.to_dict()
        if self.merges:
            buf = io.BytesIO()
            np.savez_compressed(buf, **self.merge_arrays())
            blob = buf.getvalue()
            side = path.with_name(path.stem + ".pairs.npz")
            d["merges_file"] = {"name": side.name, "sha256": hashlib.sha256(blob).hexdigest()}
            with atomic_path(side) as tmp:
                tmp.write_bytes(blob)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(d, indent=1))
        return path

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> "Plan":
        if not isinstance(d, Mapping) or d.get("format") != "heart-onnx-plan":
            raise HeartError("not a heart-onnx plan (missing \"format\": \"heart-onnx-plan\"): make one with 'heart-onnx plan'")
        if d.get("version") != PLAN_VERSION:
            raise HeartError(f"plan version {d.get('version')} is not supported (this heart-onnx reads version {PLAN_VERSION})")
        try:
            merges = []
            for i, m in enumerate(d.get("merges", [])):
                if arrays is None:
                    raise HeartError("plan has weight merges but its .pairs.npz sidecar was not loaded: keep it next to the plan JSON")
                merges.append(WeightMerge(
                    weight=m["weight"], weight_sha=m["weight_sha"], shape=tuple(m["shape"]), granularity=m["granularity"],
                    pruned=np.asarray(arrays[f"{i}.pruned"]), partner=np.asarray(arrays[f"{i}.partner"]),
                    coef=np.asarray(arrays[f"{i}.coef"]), consumer=m.get("consumer"), consumer_sha=m.get("consumer_sha"),
                    consumer_shape=tuple(m["consumer_shape"]) if m.get("consumer_shape") is not None else None,
                ))
            return cls(
                fingerprint=d["fingerprint"], family=d["family"], geometry=dict(d.get("geometry", {})),
                heads={int(k): tuple(int(h) for h in v) for k, v in d.get("heads", {}).items()},
                tokens=tuple(TokenStage(int(t["after_layer"]), int(t["keep"])) for t in d.get("tokens", [])),
                token_scorer=d.get("token_scorer", "cls_attention"),
                scorers={int(k): (tuple(float(x) for x in v["weight"]), float(v["bias"])) for k, v in d.get("scorers", {}).items()},
                fuse_dropped=bool(d.get("fuse_dropped", False)), prefix_tokens=int(d.get("prefix_tokens", 1)),
                merges=tuple(merges), anchors=dict(d.get("anchors", {})), budget=d.get("budget"),
                predicted_loss_change=d.get("predicted_loss_change"), flops_dense=d.get("flops_dense"),
                flops_pruned=d.get("flops_pruned"), notes=dict(d.get("notes", {})), version=int(d["version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HeartError(f"plan is malformed ({type(exc).__name__}: {exc}): regenerate it with 'heart-onnx plan'") from None

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HeartError(f"plan is not valid JSON ({exc.msg} at line {exc.lineno}): regenerate it with 'heart-onnx plan'") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise HeartError(f"plan file {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HeartError(f"{path} is not a plan JSON file ({exc}): make one with 'heart-onnx plan'") from None
        arrays = None
        side_info = d.get("merges_file") if isinstance(d, dict) else None
        if side_info:
            side = path.with_name(side_info["name"])
            if not side.is_file():
                raise HeartError(f"plan sidecar {side} is missing: keep it next to {path.name}")
            blob = side.read_bytes()
            if hashlib.sha256(blob).hexdigest() != side_info["sha256"]:
                raise HeartError(f"plan sidecar {side} does not match {path.name} (checksum differs): regenerate the plan")
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        return cls.from_dict(d, arrays)

    def replace(self, **changes: Any) -> "Plan":
        return dataclasses.replace(self, **changes)
