"""``benchmark`` one ONNX model, or two side by side, with the one timing protocol and energy.

    r = benchmark("model.onnx", backend="ort-cpu", batch=1, warmup=10, repeats=50)
    r.timing["median_ms"], r.energy            # energy is None on a host without a power sensor
    c = benchmark_pair("dense.onnx", "pruned.onnx")   # interleaved; c["ratio"] = dense / pruned median
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import HeartError
from .backends import make_runner
from .env import environment, power_mode_label
from .inputs import random_feed
from .power import PowerSampler, auto_sampler
from .timing import Timing, interleaved, time_fn
from .trtexec import TrtexecRunner


@dataclass
class BenchResult:
    """One model on one backend: timing summary, energy (or why not), shapes, environment."""

    model: str
    backend: str
    precision: str
    batch: int
    shapes: dict[str, list[int]]
    timing: dict
    energy: dict | None
    power: dict
    environment: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return float(self.timing["median_ms"])

    def to_dict(self) -> dict:
        return asdict(self)


def _energy(sampler: PowerSampler, t: Timing, items_per_call: int) -> tuple[dict | None, dict]:
    info = sampler.describe()
    if not sampler.available:
        return None, info
    joules = sampler.energy_windows(t.windows)
    if joules is None:
        info["reason"] = info.get("reason") or "no samples in the timed window (increase --repeats)"
        return None, info
    seconds = sum(b - a for a, b in t.windows)
    return {
        "joules_total": joules,
        "joules_per_inference": joules / t.repeats,
        "joules_per_item": joules / (t.repeats * items_per_call),
        "mean_power_w": joules / seconds if seconds > 0 else None,
        "rails_mean_w": sampler.rails_mean_w(),
        "source": sampler.source,
    }, info


def _protocol(warmup: int, repeats: int, interleave: bool = False) -> dict:
    return {
        "warmup": warmup, "repeats": repeats, "clock": "time.perf_counter per call, synchronised",
        "statistics": "median/p90/p99 of per-call latency; throughput = batch * repeats / timed seconds",
        "interleaved": interleave,
    }


def benchmark(path: str | os.PathLike, backend: str = "ort-cpu", batch: int = 1, warmup: int = 10, repeats: int = 50,
              precision: str = "fp32", power: str = "auto", shapes: dict | None = None, dims: dict | None = None,
              threads: int | None = None, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> BenchResult:
    """Time ``path`` on ``backend`` with random inputs.

    Defaults: ort-cpu, batch 1, 10 warm-up and 50 timed calls, fp32, power source "auto" (jtop,
    tegrastats, NVML, or none), ``threads=None`` (the runtime's default). ``shapes``/``dims`` resolve
    dynamic dimensions (see ``runtime.inputs``). ``backend="trtexec"`` runs the trtexec subprocess.
    """
    path = Path(path)
    if not path.exists():
        raise HeartError(f"model file not found: {path}")
    env = environment(backend)
    if backend == "trtexec":
        return _bench_trtexec(path, precision, _engine_shapes(path, backend, batch, shapes, dims), warmup, repeats, env, cache_dir)
    sampler = auto_sampler(power)
    shapes = _engine_shapes(path, backend, batch, shapes, dims)
    with make_runner(path, backend, precision=precision, threads=threads, cache_dir=cache_dir, shapes=shapes) as runner:
        feed = random_feed(runner.input_specs(), batch=batch, shapes=shapes, dims=dims, seed=seed)
        with sampler:
            t = time_fn(lambda: runner.infer(feed), warmup=warmup, repeats=repeats, sync=runner.sync, batch=batch)
            time.sleep(min(2 * sampler.interval_s, 0.2) if sampler.available else 0)  # one sample past the window
    energy, pinfo = _energy(sampler, t, batch)
    pinfo["power_mode"] = power_mode_label(env)
    return BenchResult(
        model=str(path), backend=backend, precision=precision, batch=batch,
        shapes={k: list(v.shape) for k, v in feed.items()}, timing=t.summary(), energy=energy, power=pinfo,
        environment=env, protocol=_protocol(warmup, repeats),
    )


def _engine_shapes(path, backend: str, batch: int, shapes: dict | None, dims: dict | None) -> dict | None:
    """TensorRT engines are built for fixed shapes here: resolve every input's shape from the ONNX file."""
    if backend not in ("trt", "trtexec"):
        return shapes
    from .inputs import resolve_shape
    from .ort import OrtRunner

    return {s.name: resolve_shape(s, batch, shapes, dims) for s in OrtRunner(path).input_specs()}


def _bench_trtexec(path: Path, precision: str, shapes, warmup: int, repeats: int, env: dict, cache_dir) -> BenchResult:
    engine = Path(cache_dir) / f"{path.stem}.{precision}.engine" if cache_dir else None
    r = TrtexecRunner(path, precision=precision, shapes=shapes, iterations=repeats, engine_path=engine).run()
    lat = r.get("latency_ms", {})
    timing = {"median_ms": lat.get("median"), "p90_ms": lat.get("p90"), "p99_ms": lat.get("p99"), "mean_ms": lat.get("mean"),
              "min_ms": lat.get("min"), "max_ms": lat.get("max"), "throughput_per_s": r.get("throughput_qps"),
              "batch": None, "warmup": warmup, "repeats": repeats}
    return BenchResult(str(path), "trtexec", precision, 0, {k: list(v) for k, v in (shapes or {}).items()}, timing, None,
                       {"source": "none", "available": False, "reason": "trtexec runs in its own process"},
                       env, {"tool": "trtexec", **r}, {})


def benchmark_pair(path_a: str | os.PathLike, path_b: str | os.PathLike, backend: str = "ort-cpu", batch: int = 1,
                   warmup: int = 10, repeats: int = 50, precision: str = "fp32", power: str = "auto",
                   shapes: dict | None = None, dims: dict | None = None, threads: int | None = None, seed: int = 0,
                   cache_dir: str | os.PathLike | None = None) -> dict:
    """Time two models side by side, interleaved (A B B A ...), same options as ``benchmark``.

    Returns {"a": BenchResult, "b": BenchResult, "ratio": median_a / median_b} (ratio > 1: B is faster).
    Both models get their own random inputs (they may have different shapes after token pruning). On
    ``ort-cpu`` the sessions do not spin between ops (ORT ``session.intra_op.allow_spinning=0``).
    """
    if backend == "trtexec":
        raise HeartError("--compare needs an in-process backend (ort-*, trt): trtexec runs one model per process")
    for p in (path_a, path_b):
        if not Path(p).exists():
            raise HeartError(f"model file not found: {p}")
    env = environment(backend)
    sampler = auto_sampler(power)
    # Two ORT CPU sessions alternating on the same cores: each one's spinning thread pool steals the
    # other's cores (demo ViT, 2 threads: dense/pruned ratios scattered 0.8-1.4x for one plan; without
    # spinning 0.98-0.99x, as with 1 thread).
    kw = {"spinning": False} if backend == "ort-cpu" else {}
    ra = make_runner(path_a, backend, precision=precision, threads=threads, cache_dir=cache_dir,
                     shapes=_engine_shapes(path_a, backend, batch, shapes, dims), **kw)
    rb = make_runner(path_b, backend, precision=precision, threads=threads, cache_dir=cache_dir,
                     shapes=_engine_shapes(path_b, backend, batch, shapes, dims), **kw)
    with ra, rb:
        fa = random_feed(ra.input_specs(), batch=batch, shapes=shapes, dims=dims, seed=seed)
        fb = random_feed(rb.input_specs(), batch=batch, shapes=shapes, dims=dims, seed=seed)

        def sync() -> None:
            ra.sync()
            rb.sync()

        with sampler:
            ts = interleaved({"a": lambda: ra.infer(fa), "b": lambda: rb.infer(fb)}, warmup=warmup, repeats=repeats,
                             sync=sync, batch=batch)
            time.sleep(min(2 * sampler.interval_s, 0.2) if sampler.available else 0)
    out = {}
    for key, path, feed in (("a", path_a, fa), ("b", path_b, fb)):
        energy, pinfo = _energy(sampler, ts[key], batch)
        pinfo["power_mode"] = power_mode_label(env)
        out[key] = BenchResult(str(path), backend, precision, batch, {k: list(v.shape) for k, v in feed.items()},
                               ts[key].summary(), energy, pinfo, env, _protocol(warmup, repeats, True))
    out["ratio"] = out["a"].median_ms / out["b"].median_ms if out["b"].median_ms > 0 else float("inf")
    return out


def bare_ort_loop(path: str | os.PathLike, feed: dict[str, np.ndarray], warmup: int, repeats: int, threads: int | None = None) -> list[float]:
    """Reference timing loop with nothing but ``InferenceSession.run`` (for the harness-overhead check)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feed)
    lat = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        lat.append((time.perf_counter() - t0) * 1e3)
    return lat
