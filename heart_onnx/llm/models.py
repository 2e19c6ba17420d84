"""Which Pythia to run: a published size with random weights (speed only), a local checkpoint folder
(real weights: perplexity too), or a tiny geometry for tests.

    spec = ModelSpec.parse("pythia-160m")          # random init, seed from the sweep
    spec = ModelSpec.parse("/ckpt/pythia-410m")      # a folder with config.json + weights (+ tokenizer)
    spec = ModelSpec.parse("tiny:layers=2+hidden=32+heads=4")   # "+" or "," between options
    model = spec.build(seed=0)
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .._deps import require
from ..errors import HeartError

# Published Pythia geometries (EleutherAI config.json): hidden, layers, heads, intermediate.
_SIZES = {"70m": (512, 6, 8, 2048), "160m": (768, 12, 12, 3072), "410m": (1024, 24, 16, 4096),
          "1b": (2048, 16, 8, 8192), "1.4b": (2048, 24, 16, 8192)}
_TINY_DEFAULTS = {"layers": 2, "hidden": 32, "heads": 4, "intermediate": 64, "vocab": 128, "max_pos": 512}


@dataclass(frozen=True)
class ModelSpec:
    """``kind`` is "size" (random init of a published geometry), "path" (local checkpoint) or "tiny"."""

    kind: str
    name: str  # label in results: "pythia-70m", folder name, "tiny-l2-h32"
    size: str | None = None
    path: str | None = None
    tiny: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        t = str(text).strip()
        if t.startswith("tiny"):
            kv = dict(_TINY_DEFAULTS)
            if ":" in t:
                for part in re.split(r"[,+]", t.split(":", 1)[1]):
                    if not part:
                        continue
                    k, _, v = part.partition("=")
                    if k not in kv:
                        raise HeartError(f"unknown tiny-model option {k!r}: use {', '.join(kv)}")
                    kv[k] = int(v)
            return cls("tiny", f"tiny-l{kv['layers']}-h{kv['hidden']}", tiny=kv)
        p = Path(t).expanduser()
        if p.is_dir():
            if not (p / "config.json").exists():
                raise HeartError(f"{p} has no config.json: pass a Hugging Face checkpoint folder or a size like pythia-70m")
            return cls("path", p.name, path=str(p.resolve()))
        key = t.lower().removeprefix("eleutherai/").removeprefix("pythia-").removeprefix("pythia_")
        if key in _SIZES:
            return cls("size", f"pythia-{key}", size=key)
        raise HeartError(f"unknown model {text!r}: use pythia-70m/160m/410m/1b/1.4b (random init), a local checkpoint "
                         "folder (real weights), or tiny:layers=2+hidden=32+heads=4")

    @property
    def real_weights(self) -> bool:
        return self.kind == "path"

    def key(self) -> str:
        """Stable identity of the weights' source (for caches and cell keys)."""
        blob = json.dumps({"kind": self.kind, "size": self.size, "path": self.path, "tiny": self.tiny}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def build(self, seed: int = 0):
        """The ``GPTNeoXForCausalLM`` in eval mode (random init uses ``seed``)."""
        import torch

        tf = require("transformers", "Pythia models")
        if self.kind == "path":
            try:
                return tf.GPTNeoXForCausalLM.from_pretrained(self.path, local_files_only=True, attn_implementation="eager").eval()
            except Exception as exc:  # noqa: BLE001 - HF raises many kinds for broken folders
                raise HeartError(f"cannot load the checkpoint in {self.path}: {exc}") from exc
        torch.manual_seed(seed)
        if self.kind == "size":
            try:
                from ..models import zoo

                return zoo.pythia(self.size)
            except ImportError:  # zoo not available: same published configuration built here
                pass
            h, l, a, i = _SIZES[self.size]
            return _neox(tf, h, l, a, i, 50304, 2048)
        k = self.tiny
        return _neox(tf, k["hidden"], k["layers"], k["heads"], k["intermediate"], k["vocab"], k["max_pos"])

    def tokenizer(self):
        if self.kind != "path":
            return None
        tf = require("transformers", "tokenizers")
        try:
            return tf.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception:  # noqa: BLE001 - no tokenizer files in the folder
            return None


def _neox(tf, hidden, layers, heads, inter, vocab, max_pos):
    cfg = tf.GPTNeoXConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
        rotary_pct=0.25, rotary_emb_base=10000, vocab_size=vocab, max_position_embeddings=max_pos,
        use_parallel_residual=True, hidden_act="gelu", layer_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )
    return tf.GPTNeoXForCausalLM(cfg).eval()


def param_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))
