"""Export HF GPT-NeoX (Pythia) as an ONNX decoder with an explicit KV cache.

Two graphs, both taking flat tensors so any runtime (ONNX Runtime, TensorRT) can run them:

- ``prefill.onnx``: ``input_ids`` (B, T) int64, ``attention_mask`` (B, T) int64
  -> ``logits`` (B, T, V), ``present.{i}.key`` / ``present.{i}.value`` (B, H, T, Dh) for every layer i;
- ``decode.onnx``: ``input_ids`` (B, 1), ``attention_mask`` (B, P+1), ``past.{i}.key|value`` (B, H, P, Dh)
  -> ``logits`` (B, 1, V), ``present.{i}.key|value`` (B, H, P+1, Dh).

Position ids are ``cumsum(attention_mask) - 1`` inside the graph, so left padding works. The
wrapper builds a ``DynamicCache`` from the flat past tensors and flattens the cache it returns.
``exporter`` "torchscript" (default: fast, dynamic axes) or "dynamo" (``torch.export`` with Dims).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._deps import require
from ..errors import HeartError
from ..fileio import write_text_atomic


class KVWrapper(nn.Module):
    """Flat-tensor interface around ``GPTNeoXForCausalLM`` (``with_past`` selects decode vs prefill)."""

    def __init__(self, model: nn.Module, with_past: bool):
        super().__init__()
        self.model = model
        self.with_past = with_past
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        cache_utils = require("transformers.cache_utils", "the KV-cache decoder")
        if self.with_past:
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]  # (B, H, P, Dh) each
            cache = cache_utils.DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        else:
            cache = cache_utils.DynamicCache(config=self.model.config)
        T = input_ids.shape[1]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                         position_ids=position_ids, use_cache=True)
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]  # (B, H, P+T, Dh)
        return (out.logits, *flat)


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


@dataclass(frozen=True)
class KVDecoderFiles:
    prefill: Path
    decode: Path
    num_layers: int
    num_heads: int
    head_dim: int
    vocab: int


def export_kv_decoder(model: nn.Module, out_dir: str | os.PathLike, exporter: str = "torchscript", opset: int = 17,
                      example_batch: int = 2, example_len: int = 4) -> KVDecoderFiles:
    """Write ``prefill.onnx`` and ``decode.onnx`` to ``out_dir`` (defaults: TorchScript exporter, opset 17).

    Batch, prompt length and past length are dynamic. ``export.json`` is written last: a folder
    without it holds an interrupted export (``load_kv_decoder_files`` returns None for it).
    """
    if exporter not in ("torchscript", "dynamo"):
        raise HeartError(f"unknown exporter {exporter!r}: use torchscript or dynamo")
    cfg = model.config
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    Dh = cfg.hidden_size // H
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.json").unlink(missing_ok=True)
    B, T = example_batch, example_len
    dev = next(model.parameters()).device
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    am = torch.ones(B, T, dtype=torch.int64, device=dev)
    past = tuple(torch.randn(B, H, T, Dh, device=dev) for _ in range(2 * L))
    ids1 = torch.randint(0, cfg.vocab_size, (B, 1), device=dev)
    am1 = torch.ones(B, T + 1, dtype=torch.int64, device=dev)
    outs = ["logits", *kv_names(L, "present")]
    was_training = model.training
    model.eval()
    try:
        for name, wrapper, args, in_names in (
            ("prefill", KVWrapper(model, False), (ids, am), ["input_ids", "attention_mask"]),
            ("decode", KVWrapper(model, True), (ids1, am1, *past), ["input_ids", "attention_mask", *kv_names(L, "past")]),
        ):
            tmp = out / f"{name}.onnx"
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about the cache's Python-side checks
                if exporter == "torchscript":
                    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "seq"}}
                    for n in in_names[2:]:
                        axes[n] = {0: "batch", 2: "past"}
                    for n in outs[1:]:
                        axes[n] = {0: "batch", 2: "total"}
                    torch.onnx.export(wrapper, args, str(tmp), input_names=in_names, output_names=outs, dynamic_axes=axes,
                                      opset_version=opset, dynamo=False)
                else:
                    Bd = torch.export.Dim("batch", min=1, max=1024)
                    if name == "prefill":
                        Sd = torch.export.Dim("seq", min=2, max=cfg.max_position_embeddings)
                        shapes = ({0: Bd, 1: Sd}, {0: Bd, 1: Sd})
                    else:
                        Pd = torch.export.Dim("past", min=1, max=cfg.max_position_embeddings - 1)
                        shapes = ({0: Bd}, {0: Bd, 1: Pd + 1}, tuple({0: Bd, 2: Pd} for _ in range(2 * L)))
                    torch.onnx.export(wrapper, args, str(tmp), input_names=in_names, output_names=outs, dynamic_shapes=shapes,
                                      opset_version=max(opset, 18), dynamo=True, optimize=True, verbose=False)
    finally:
        model.train(was_training)
    files = KVDecoderFiles(out / "prefill.onnx", out / "decode.onnx", L, H, Dh, cfg.vocab_size)
    meta = {"num_layers": L, "num_heads": H, "head_dim": Dh, "vocab": cfg.vocab_size, "exporter": exporter, "opset": opset}
    write_text_atomic(out / "export.json", json.dumps(meta))
    return files


def load_kv_decoder_files(out_dir: str | os.PathLike) -> KVDecoderFiles | None:
    """The files of a finished export in ``out_dir``, or None when there is none (or it was interrupted)."""
    out = Path(out_dir)
    try:
        meta = json.loads((out / "export.json").read_text())
    except (OSError, ValueError):
        return None
    if not ((out / "prefill.onnx").exists() and (out / "decode.onnx").exists()):
        return None
    return KVDecoderFiles(out / "prefill.onnx", out / "decode.onnx", meta["num_layers"], meta["num_heads"], meta["head_dim"], meta["vocab"])
