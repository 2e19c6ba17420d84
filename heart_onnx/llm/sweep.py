"""The Pythia batch-testing sweep: a grid of cells, one JSONL line per finished cell, resumable.

    cfg = SweepConfig(models=("pythia-70m", "pythia-160m"), backends=("torch-cpu", "ort-cpu"),
                      batches=(1, 4), prompts=(32, 128), new_tokens=(8,))
    run_sweep(cfg, "artifacts/sweep")      # results.jsonl, then export_csv / plot_results

Grid: model x backend x precision x batch x prompt length x new tokens x power mode. Each cell
generates greedily from a random prompt (seeded by the cell) ``repeats`` times after ``warmup``
runs and records the medians of time to first token, decode tokens/s and end-to-end latency,
peak memory, energy per token (when the host has a power sensor), perplexity on ``text_file``
(real weights only), the environment and the exact configuration.

Robustness: a cell's line is appended with flush + fsync as soon as it finishes; a failing cell
(out of memory, engine build failure, unsupported precision) is recorded with its error and the
sweep goes on; running the same sweep again skips cells already in the file (failed ones too,
unless ``retry_failed``). A line cut short by a kill is ignored (and the cell re-run).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import HeartError
from .models import ModelSpec, param_count

RESULTS = "results.jsonl"
SCHEMA = 1
BACKENDS = ("torch-cpu", "torch-cuda", "ort-cpu", "ort-cuda", "ort-trt", "trt")


@dataclass(frozen=True)
class SweepConfig:
    """The grid and the protocol (defaults in brackets): models [pythia-70m], backends [torch-cpu],
    precisions [fp32], batches [1], prompts [32], new_tokens [8], power_modes [current] (Jetson
    nvpmodel ids/names; switched only when ``set_power_mode``), repeats [3], warmup [1], seed [0],
    threads [None], text_file [None], plan [None: a Plan JSON to apply by masking before measuring],
    exporter [torchscript], power [auto], retry_failed [False], ppl_max_tokens [4096]."""

    models: tuple[str, ...] = ("pythia-70m",)
    backends: tuple[str, ...] = ("torch-cpu",)
    precisions: tuple[str, ...] = ("fp32",)
    batches: tuple[int, ...] = (1,)
    prompts: tuple[int, ...] = (32,)
    new_tokens: tuple[int, ...] = (8,)
    power_modes: tuple[str, ...] = ("current",)
    set_power_mode: bool = False
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    threads: int | None = None
    text_file: str | None = None
    plan: str | None = None
    exporter: str = "torchscript"
    power: str = "auto"
    retry_failed: bool = False
    ppl_max_tokens: int = 4096

    def validate(self) -> None:
        for b in self.backends:
            if b not in BACKENDS:
                raise HeartError(f"unknown sweep backend {b!r}: use {', '.join(BACKENDS)}")
        for name, vals in (("batch", self.batches), ("prompt", self.prompts), ("new tokens", self.new_tokens)):
            if not vals or any(int(v) < 1 for v in vals):
                raise HeartError(f"{name} values must be >= 1, got {list(vals)}")
        if self.repeats < 1 or self.warmup < 0:
            raise HeartError("repeats must be >= 1 and warmup >= 0")
        if not self.set_power_mode and any(m != "current" for m in self.power_modes):
            raise HeartError("switching power modes changes the device: add --set-power-mode, or leave --power-modes out "
                             "to measure (and record) the current mode")
        for m in self.models:
            ModelSpec.parse(m)

    def plan_hash(self) -> str | None:
        if not self.plan:
            return None
        return hashlib.sha256(Path(self.plan).read_bytes()).hexdigest()[:12]


@dataclass(frozen=True)
class Cell:
    model: str
    backend: str
    precision: str
    batch: int
    prompt: int
    new_tokens: int
    power_mode: str

    @property
    def id(self) -> str:
        return f"{self.model}|{self.backend}|{self.precision}|b{self.batch}|p{self.prompt}|n{self.new_tokens}|{self.power_mode}"

    def seed(self, base: int) -> int:
        return int(hashlib.sha256(f"{base}|{self.model}|{self.batch}|{self.prompt}".encode()).hexdigest()[:8], 16)


def cells(cfg: SweepConfig) -> list[Cell]:
    """The grid in run order (power mode, model, backend, precision outermost: loads happen once)."""
    out = []
    for pm in cfg.power_modes:
        for m in cfg.models:
            for b in cfg.backends:
                for p in cfg.precisions:
                    for bs in cfg.batches:
                        for pl in cfg.prompts:
                            for nt in cfg.new_tokens:
                                out.append(Cell(m, b, p, int(bs), int(pl), int(nt), str(pm)))
    return out


def _run_key(cfg: SweepConfig) -> str:
    """What makes two results comparable beyond the cell: seed, plan, exporter, protocol."""
    blob = json.dumps({"seed": cfg.seed, "plan": cfg.plan_hash(), "exporter": cfg.exporter, "repeats": cfg.repeats,
                       "warmup": cfg.warmup, "threads": cfg.threads}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


# ---------------------------------------------------------------- results file
def read_results(path: str | os.PathLike) -> list[dict]:
    """All complete records of a results file (a truncated last line is skipped)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # cut short by a kill
        if isinstance(rec, dict) and "cell_id" in rec:
            out.append(rec)
    return out


def append_record(path: str | os.PathLike, rec: dict) -> None:
    """Append one JSON line and make it durable (flush + fsync) before returning."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(rec, default=_json_default, allow_nan=True)
    with open(p, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:  # a previous writer killed mid-line leaves no newline: start a fresh line
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(data.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------- progress
class Progress:
    """One status line on stderr with done/total, percentage and ETA (from this run's cell times)."""

    def __init__(self, total: int, already: int, stream=None, enabled: bool = True):
        self.total, self.done, self.stream, self.enabled = total, already, stream or sys.stderr, enabled
        self._times: list[float] = []
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def eta_s(self) -> float | None:
        if not self._times:
            return None
        return float(np.mean(self._times)) * (self.total - self.done)

    def update(self, seconds: float, label: str, status: str) -> None:
        self.done += 1
        self._times.append(seconds)
        if not self.enabled:
            return
        eta = self.eta_s()
        eta_txt = "--" if eta is None else (f"{eta / 60:.0f}m{eta % 60:02.0f}s" if eta >= 60 else f"{eta:.0f}s")
        pct = 100.0 * self.done / max(self.total, 1)
        width = 24
        fill = int(width * self.done / max(self.total, 1))
        line = f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {pct:5.1f}% ETA {eta_txt}  {status:5s} {label}"
        self.stream.write(("\r" + line + "\033[K") if self._tty else line + "\n")
        if self._tty and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


# ---------------------------------------------------------------- generators per backend
class _Generator:
    """Prepared model on one backend/precision: ``gen(ids, new_tokens) -> GenStats``."""

    def __init__(self, gen: Callable, sync: Callable[[], None], cuda: bool, close: Callable[[], None] = lambda: None,
                 info: dict | None = None):
        self.gen, self.sync, self.cuda, self.close, self.info = gen, sync, cuda, close, info or {}


def _prepare(model, spec: ModelSpec, backend: str, precision: str, cfg: SweepConfig, out_dir: Path, plan_ctx) -> _Generator:
    import torch

    from .generate import OnnxKVDecoder, torch_generate

    if backend.startswith("torch"):
        device = "cuda" if backend == "torch-cuda" else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise HeartError("PyTorch sees no CUDA device: drop torch-cuda from --backends")
        dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        if dt is None:
            raise HeartError(f"precision {precision} is not available for PyTorch: use fp32, fp16 or bf16")
        m = model.to(device=device, dtype=dt)
        sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
        return _Generator(lambda ids, n: torch_generate(m, ids, n, device=device, sync=sync), sync, device == "cuda",
                          lambda: model.to(device="cpu", dtype=torch.float32))
    # ONNX backends: export once per model (+plan, exporter), cached beside the results
    from .kv_export import export_kv_decoder, load_kv_decoder_files

    tag = f"{spec.name}-{spec.key()}-s{cfg.seed}-{cfg.exporter}" + (f"-plan{cfg.plan_hash()}" if cfg.plan else "")
    onnx_dir = out_dir / "onnx" / tag
    files = load_kv_decoder_files(onnx_dir)
    exported = False
    if files is None:
        with plan_ctx():
            files = export_kv_decoder(model.float().cpu(), onnx_dir, exporter=cfg.exporter)
        exported = True
    max_len = max(cfg.prompts) + max(cfg.new_tokens)
    dec = OnnxKVDecoder(files, backend, precision=precision, threads=cfg.threads, cache_dir=out_dir / "engines" / tag,
                        max_batch=max(cfg.batches), max_len=max_len, opt_batch=min(cfg.batches), opt_len=min(cfg.prompts))
    dec.__enter__()
    return _Generator(dec.generate, dec.sync, backend != "ort-cpu", lambda: dec.__exit__(None, None, None),
                      {"onnx_dir": str(onnx_dir), "exported_now": exported})


def _measure(g: _Generator, cell: Cell, cfg: SweepConfig, vocab: int) -> dict:
    from ..runtime.memory import PeakMemory
    from ..runtime.power import auto_sampler

    rng = np.random.default_rng(cell.seed(cfg.seed))
    ids = rng.integers(0, vocab, (cell.batch, cell.prompt)).astype(np.int64)  # (B, T) random prompt
    for _ in range(cfg.warmup):
        g.gen(ids, min(2, cell.new_tokens))
    sampler = auto_sampler(cfg.power)
    runs, windows = [], []
    with PeakMemory(cuda=g.cuda) as mem, sampler:
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            runs.append(g.gen(ids, cell.new_tokens))
            windows.append((t0, time.perf_counter()))
        if sampler.available:
            time.sleep(min(2 * sampler.interval_s, 0.2))
    med = lambda xs: float(np.median([x for x in xs if x is not None])) if any(x is not None for x in xs) else None  # noqa: E731
    tokens_total = cfg.repeats * cell.batch * cell.new_tokens
    joules = sampler.energy_windows(windows) if sampler.available else None
    seconds = sum(b - a for a, b in windows)
    return {
        "ttft_ms": med([r.ttft_s * 1e3 for r in runs]),
        "decode_tokens_per_s": med([r.decode_tokens_per_s for r in runs]),
        "e2e_latency_ms": med([r.e2e_s * 1e3 for r in runs]),
        "e2e_tokens_per_s": med([cell.batch * cell.new_tokens / r.e2e_s for r in runs]),
        "per_token_decode_ms_p90": float(np.percentile(np.concatenate([r.step_s for r in runs]) * 1e3, 90)) if cell.new_tokens > 1 else None,
        "e2e_latency_ms_runs": [r.e2e_s * 1e3 for r in runs],
        "peak_rss_mb": mem.peak_rss_mb,
        "peak_cuda_mb": mem.peak_cuda_mb,
        "energy_j_per_token": joules / tokens_total if joules is not None else None,
        "energy_j_total": joules,
        "mean_power_w": joules / seconds if joules is not None and seconds > 0 else None,
        "power_source": sampler.source,
        "power_available": sampler.available,
        "power_reason": sampler.reason or None,
        "tokens_checksum": int(runs[0].tokens.sum()),
    }


# ---------------------------------------------------------------- the sweep
@dataclass
class SweepSummary:
    results: Path
    total: int
    skipped: int
    ran: int
    failed: int
    records: list[dict] = field(default_factory=list)


def run_sweep(cfg: SweepConfig, out_dir: str | os.PathLike, progress: bool = True,
              stream=None, on_cell: Callable[[dict], None] | None = None) -> SweepSummary:
    """Run every cell of ``cfg`` not yet in ``out_dir/results.jsonl``; see the module docstring."""
    import torch

    from ..runtime.env import environment, power_mode_label, set_power_mode

    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS
    run_key = _run_key(cfg)
    prior = read_results(results)
    finished = {r["cell_id"] for r in prior if r.get("run_key") == run_key and (r.get("status") == "ok" or not cfg.retry_failed)}
    grid = cells(cfg)
    todo = [c for c in grid if c.id not in finished]
    summary = SweepSummary(results, len(grid), len(grid) - len(todo), 0, 0)
    bar = Progress(len(grid), len(grid) - len(todo), stream=stream, enabled=progress)
    if not todo:
        return summary
    from ..plan import Plan

    plan = Plan.load(cfg.plan) if cfg.plan else None
    cfg_dict = asdict(cfg)
    by_mode: dict[str, list[Cell]] = {}
    for c in todo:
        by_mode.setdefault(c.power_mode, []).append(c)
    for mode, mode_cells in by_mode.items():
        switched = None
        mode_error = None
        if mode != "current":
            try:
                switched = set_power_mode(mode)
            except HeartError as exc:
                mode_error = f"power mode {mode}: {exc}"
        env = environment()
        recorded_mode = power_mode_label(env)
        models = []
        for c in mode_cells:
            if c.model not in models:
                models.append(c.model)
        for mname in models:
            spec = ModelSpec.parse(mname)
            mcells = [c for c in mode_cells if c.model == mname]
            model = None
            model_error = mode_error
            ppl = None
            if model_error is None:
                try:
                    model = spec.build(seed=cfg.seed)
                except Exception as exc:  # noqa: BLE001 - recorded per cell
                    model_error = f"{type(exc).__name__}: {exc}"
            if model is not None and spec.real_weights and cfg.text_file:
                try:
                    from .perplexity import perplexity_file

                    with _plan_context(model, plan)():
                        ppl = perplexity_file(model, spec.tokenizer(), cfg.text_file, max_tokens=cfg.ppl_max_tokens)
                except Exception as exc:  # noqa: BLE001
                    ppl = {"error": f"{type(exc).__name__}: {exc}"}
            geometry = {}
            if model is not None:
                c_ = model.config
                geometry = {"params": param_count(model), "layers": c_.num_hidden_layers, "heads": c_.num_attention_heads,
                            "hidden": c_.hidden_size, "vocab": c_.vocab_size}
            groups: dict[tuple[str, str], list[Cell]] = {}
            for c in mcells:
                groups.setdefault((c.backend, c.precision), []).append(c)
            for (backend, precision), gcells in groups.items():
                gen = None
                group_error = model_error
                if group_error is None:
                    try:
                        gen = _prepare(model, spec, backend, precision, cfg, out, _plan_context(model, plan))
                    except Exception as exc:  # noqa: BLE001 - engine build failure, missing backend, ...
                        group_error = f"{type(exc).__name__}: {exc}"
                try:
                    for c in gcells:
                        t0 = time.perf_counter()
                        rec = {
                            "schema": SCHEMA, "cell_id": c.id, "run_key": run_key, **asdict(c), "model_kind": spec.kind,
                            "real_weights": spec.real_weights, **geometry, "plan": cfg.plan, "plan_sha": cfg.plan_hash(),
                            "power_mode_requested": mode, "power_mode_recorded": recorded_mode, "power_mode_switched_to": switched,
                            "jetson_clocks": (env.get("jetson") or {}).get("jetson_clocks"),
                        }
                        if group_error is not None:
                            rec.update(status="error", error=group_error)
                        else:
                            try:
                                with _plan_context(model, plan)() if backend.startswith("torch") else nullcontext():
                                    rec.update(_measure(gen, c, cfg, geometry["vocab"]))
                                rec["status"] = "ok"
                            except KeyboardInterrupt:
                                raise
                            except Exception as exc:  # noqa: BLE001 - OOM, runtime failure: record and go on
                                rec.update(status="error", error=f"{type(exc).__name__}: {exc}",
                                           traceback=traceback.format_exc(limit=3)[-1500:])
                                if "out of memory" in str(exc).lower() and torch.cuda.is_available():
                                    torch.cuda.empty_cache()
                        if ppl is not None:
                            rec["perplexity"] = ppl.get("perplexity")
                            rec["perplexity_info"] = ppl
                        rec.update(backend_info=(gen.info if gen else {}), seconds=time.perf_counter() - t0,
                                   finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), environment=env, config=cfg_dict)
                        append_record(results, rec)
                        summary.ran += 1
                        summary.failed += rec["status"] != "ok"
                        summary.records.append(rec)
                        if on_cell:
                            on_cell(rec)
                        bar.update(rec["seconds"], c.id, rec["status"])
                finally:
                    if gen is not None:
                        gen.close()
            del model
    return summary


def _plan_context(model, plan):
    """A zero-argument factory of the masking context (heads zeroed as in engineer G's reference)."""
    if plan is None or model is None:
        return nullcontext
    try:
        from ..models.masking import apply_plan
    except ImportError as exc:
        raise HeartError("applying a plan needs heart_onnx.models.masking (not in this build)") from exc
    return lambda: apply_plan(model, plan)


def iter_ok(records: list[dict]) -> Iterator[dict]:
    return (r for r in records if r.get("status") == "ok")
