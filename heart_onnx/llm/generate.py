"""Greedy generation with timing: PyTorch eager (HF cache) and the ONNX KV-cache decoder.

Every generator returns ``GenStats``: the generated tokens (B, N) and the time to first token
(prefill + first token), the decode time of the remaining N-1 tokens, and end-to-end latency.
Decode tokens/s counts all sequences of the batch: ``B * (N - 1) / decode_s``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import HeartError
from .kv_export import KVDecoderFiles, kv_names


@dataclass
class GenStats:
    tokens: np.ndarray  # (B, N) int64
    ttft_s: float
    decode_s: float
    e2e_s: float
    step_s: list[float] = field(default_factory=list)  # per decode step

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def new_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def decode_tokens_per_s(self) -> float | None:
        n = self.batch * (self.new_tokens - 1)
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None


def torch_generate(model, input_ids: np.ndarray, new_tokens: int, device: str = "cpu",
                   sync: Callable[[], None] | None = None) -> GenStats:
    """Greedy decoding with the HF model's own KV cache (``use_cache=True``)."""
    import torch

    if new_tokens < 1:
        raise HeartError("new tokens must be >= 1")
    sync = sync or (lambda: None)
    ids = torch.as_tensor(input_ids, device=device)
    B = ids.shape[0]
    am = torch.ones_like(ids)
    toks = []
    steps = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=am, use_cache=True)
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)  # (B, 1)
        sync()
        t1 = time.perf_counter()
        toks.append(nxt)
        past = out.past_key_values
        for _ in range(new_tokens - 1):
            s0 = time.perf_counter()
            am = torch.cat([am, torch.ones(B, 1, dtype=am.dtype, device=am.device)], dim=1)
            out = model(input_ids=nxt, attention_mask=am, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            sync()
            steps.append(time.perf_counter() - s0)
            toks.append(nxt)
        t2 = time.perf_counter()
    tokens = torch.cat(toks, dim=1).cpu().numpy().astype(np.int64)
    return GenStats(tokens, t1 - t0, t2 - t1, t2 - t0, steps)


def _calib_feeds(files: KVDecoderFiles, decode: bool, batch: int, length: int, n: int = 4) -> list[dict]:
    """Random calibration feeds (token ids, ones mask, N(0,1) past) for int8 engine builds."""
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(n):
        T = 1 if decode else length
        f = {"input_ids": rng.integers(0, files.vocab, (batch, T)).astype(np.int64),
             "attention_mask": np.ones((batch, length + 1 if decode else length), np.int64)}
        if decode:
            for name in kv_names(files.num_layers, "past"):
                f[name] = rng.standard_normal((batch, files.num_heads, length, files.head_dim)).astype(np.float32)
        feeds.append(f)
    return feeds


class OnnxKVDecoder:
    """Run ``prefill.onnx`` once and ``decode.onnx`` per token (context manager, like a runner).

    Options (defaults): ``backend="ort-cpu"`` (ort-cuda, ort-trt, trt), ``precision="fp32"``,
    ``threads=None``, ``cache_dir=None`` (TensorRT engines), ``max_batch=8`` and ``max_len=2048``
    (the TensorRT optimisation-profile ranges).
    """

    def __init__(self, files: KVDecoderFiles, backend: str = "ort-cpu", precision: str = "fp32", threads: int | None = None,
                 cache_dir=None, max_batch: int = 8, max_len: int = 2048, opt_batch: int = 1, opt_len: int = 128):
        from ..runtime.backends import make_runner

        self.files = files
        self.backend = backend
        L, H, Dh = files.num_layers, files.num_heads, files.head_dim
        kw: dict = {}
        kw_d: dict = {}
        if backend == "trt":
            kw = {"profiles": {"input_ids": ((1, 1), (opt_batch, opt_len), (max_batch, max_len)),
                               "attention_mask": ((1, 1), (opt_batch, opt_len), (max_batch, max_len))}}
            pk = {n: ((1, H, 1, Dh), (opt_batch, H, opt_len, Dh), (max_batch, H, max_len - 1, Dh)) for n in kv_names(L, "past")}
            kw_d = {"profiles": {"input_ids": ((1, 1), (opt_batch, 1), (max_batch, 1)),
                                 "attention_mask": ((1, 2), (opt_batch, opt_len + 1), (max_batch, max_len)), **pk}}
            if precision == "int8":  # random calibration data: the speed of int8, not its accuracy
                kw["calib_batches"] = _calib_feeds(files, False, opt_batch, opt_len)
                kw_d["calib_batches"] = _calib_feeds(files, True, opt_batch, opt_len)
        self.prefill = make_runner(files.prefill, backend, precision=precision, threads=threads, cache_dir=cache_dir, **kw)
        self.decode = make_runner(files.decode, backend, precision=precision, threads=threads, cache_dir=cache_dir, **kw_d)
        self._past_in = kv_names(L, "past")
        self._present = kv_names(L, "present")
        self._dtypes: dict[int, dict[str, np.dtype]] = {}

    def __enter__(self) -> "OnnxKVDecoder":
        self.prefill.__enter__()
        try:
            self.decode.__enter__()
        except BaseException:
            self.prefill.__exit__(None, None, None)
            raise
        if self.backend == "trt":  # TensorRT 8.x engines take int32 ids/masks where the graph said int64
            for r in (self.prefill, self.decode):
                self._dtypes[id(r)] = {s.name: np.dtype(s.dtype) for s in r.input_specs()}
        return self

    def _run(self, runner, feed: dict) -> dict:
        dts = self._dtypes.get(id(runner))
        if dts:
            feed = {k: (v.astype(dts[k]) if k in dts and v.dtype != dts[k] else v) for k, v in feed.items()}
        return runner.infer(feed)

    def __exit__(self, *exc) -> None:
        try:
            self.decode.__exit__(*exc)
        finally:
            self.prefill.__exit__(*exc)

    def sync(self) -> None:
        self.prefill.sync()
        self.decode.sync()

    def prefill_step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        o = self._run(self.prefill, {"input_ids": input_ids, "attention_mask": attention_mask})
        return o["logits"], [o[n] for n in self._present]

    def decode_step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, **dict(zip(self._past_in, past))}
        o = self._run(self.decode, feed)
        return o["logits"], [o[n] for n in self._present]

    def generate(self, input_ids: np.ndarray, new_tokens: int) -> GenStats:
        """Greedy decoding with the KV cache carried between steps as plain arrays."""
        if new_tokens < 1:
            raise HeartError("new tokens must be >= 1")
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        B = ids.shape[0]
        am = np.ones_like(ids)
        steps = []
        t0 = time.perf_counter()
        logits, past = self.prefill_step(ids, am)
        nxt = logits[:, -1, :].argmax(-1)[:, None].astype(np.int64)  # (B, 1)
        self.sync()
        t1 = time.perf_counter()
        toks = [nxt]
        for _ in range(new_tokens - 1):
            s0 = time.perf_counter()
            am = np.concatenate([am, np.ones((B, 1), np.int64)], axis=1)
            logits, past = self.decode_step(nxt, am, past)
            nxt = logits[:, -1, :].argmax(-1)[:, None].astype(np.int64)
            self.sync()
            steps.append(time.perf_counter() - s0)
            toks.append(nxt)
        t2 = time.perf_counter()
        return GenStats(np.concatenate(toks, axis=1), t1 - t0, t2 - t1, t2 - t0, steps)

    def generate_no_cache(self, input_ids: np.ndarray, new_tokens: int) -> GenStats:
        """Greedy decoding that re-runs the whole sequence through ``prefill.onnx`` every step (no cache)."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        steps = []
        t0 = time.perf_counter()
        logits, _ = self.prefill_step(ids, np.ones_like(ids))
        nxt = logits[:, -1, :].argmax(-1)[:, None].astype(np.int64)
        self.sync()
        t1 = time.perf_counter()
        toks = [nxt]
        for _ in range(new_tokens - 1):
            s0 = time.perf_counter()
            ids = np.concatenate([ids, nxt], axis=1)
            logits, _ = self.prefill_step(ids, np.ones_like(ids))
            nxt = logits[:, -1, :].argmax(-1)[:, None].astype(np.int64)
            self.sync()
            steps.append(time.perf_counter() - s0)
            toks.append(nxt)
        t2 = time.perf_counter()
        return GenStats(np.concatenate(toks, axis=1), t1 - t0, t2 - t1, t2 - t0, steps)
