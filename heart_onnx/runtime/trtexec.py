"""``trtexec`` as a subprocess (what JetPack ships in /usr/src/tensorrt/bin) and its output parsed.

    r = TrtexecRunner("m.onnx", precision="fp16", engine_path="m.engine").run()
    r["latency_ms"]["median"], r["throughput_qps"]

``parse_trtexec_output`` reads the "=== Performance summary ===" block of TensorRT 8.x and 10.x:
``Throughput: N qps`` and, per metric (Latency, Enqueue Time, H2D Latency, GPU Compute Time,
D2H Latency, End-to-End Host Latency), ``min/max/mean/median`` and ``percentile(P%)`` (TRT <= 8.4
prints only 99%, TRT >= 8.5 prints 90/95/99 by default), plus the ``TensorRT vXXYYZZ`` version
and whether the run ``PASSED``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import HeartError
from .trt_flags import init_engine_options

_METRIC = re.compile(r"\[I\]\s+(Latency|Enqueue Time|H2D Latency|GPU Compute Time|D2H Latency|End-to-End Host Latency):\s*(.*)$", re.M)
_FIELD = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=\s*([0-9.eE+-]+)\s*ms")
_THROUGHPUT = re.compile(r"\[I\]\s+Throughput:\s*([0-9.eE+-]+)\s*qps")
_VERSION = re.compile(r"&&&& (PASSED|FAILED|RUNNING) TensorRT\.trtexec \[TensorRT v(\d+)\]")
_WALL = re.compile(r"\[I\]\s+Total Host Walltime:\s*([0-9.eE+-]+)\s*s")
_GPU_TOTAL = re.compile(r"\[I\]\s+Total GPU Compute Time:\s*([0-9.eE+-]+)\s*s")
_KEYS = {"Latency": "latency_ms", "Enqueue Time": "enqueue_ms", "H2D Latency": "h2d_ms", "GPU Compute Time": "gpu_compute_ms",
         "D2H Latency": "d2h_ms", "End-to-End Host Latency": "e2e_host_latency_ms"}


def _version(code: str) -> str:
    """'8502' -> '8.5.2', '100300' -> '10.3.0', '8601' -> '8.6.1' (major, minor, patch, build digits)."""
    if len(code) == 4:  # TRT 8: M m p b
        return f"{code[0]}.{code[1]}.{code[2]}"
    if len(code) >= 6:  # TRT 10: MM mm pp
        return f"{int(code[:2])}.{int(code[2:4])}.{int(code[4:6])}"
    return code


def parse_trtexec_output(text: str) -> dict:
    """Parse the performance summary; raises HeartError when there is none (build failed, etc.)."""
    out: dict = {"passed": None, "tensorrt_version": None, "throughput_qps": None}
    versions = _VERSION.findall(text)
    if versions:
        status = [s for s, _ in versions if s in ("PASSED", "FAILED")]
        out["passed"] = status[-1] == "PASSED" if status else None
        out["tensorrt_version"] = _version(versions[-1][1])
    m = _THROUGHPUT.search(text)
    if m:
        out["throughput_qps"] = float(m.group(1))
    for name, rest in _METRIC.findall(text):
        stats: dict[str, float] = {}
        for field, pct, val in _FIELD.findall(rest):
            stats[f"p{pct.rstrip('0').rstrip('.') if '.' in pct else pct}" if pct else field] = float(val)
        out[_KEYS[name]] = stats
    for rx, key in ((_WALL, "total_host_walltime_s"), (_GPU_TOTAL, "total_gpu_compute_s")):
        m = rx.search(text)
        if m:
            out[key] = float(m.group(1))
    if out["throughput_qps"] is None and "latency_ms" not in out:
        tail = text.strip().splitlines()[-3:] if text.strip() else ["(no output)"]
        raise HeartError("trtexec printed no performance summary (did the engine build fail?): " + " | ".join(tail))
    return out


def find_trtexec(explicit: str | None = None) -> str:
    """``explicit``, else ``trtexec`` on PATH, else JetPack's /usr/src/tensorrt/bin/trtexec."""
    for cand in (explicit, shutil.which("trtexec"), "/usr/src/tensorrt/bin/trtexec"):
        if cand and Path(cand).exists():
            return str(cand)
    raise HeartError("trtexec not found: install TensorRT (JetPack ships /usr/src/tensorrt/bin/trtexec) or add its folder to PATH")


class TrtexecRunner:
    """Build and time an engine with ``trtexec`` in a subprocess.

    Options (defaults): ``precision="fp32"`` (fp16, int8, best), ``sparsity=True`` (``--sparsity=enable``),
    ``engine_path=None`` (``--saveEngine``; reused with ``--loadEngine`` when it exists), ``timing_cache=None``,
    ``shapes=None`` ({input: shape} -> ``--shapes``), ``iterations=200``, ``warmup_ms=500``, ``duration_s=3``,
    ``extra_args=()``, ``trtexec=None`` (found by ``find_trtexec``), ``timeout_s=3600``.
    It is a timing tool, not an inference runner: ``run()`` returns the parsed summary.
    """

    backend = "trtexec"

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", sparsity: bool = True,
                 engine_path: str | os.PathLike | None = None, timing_cache: str | os.PathLike | None = None,
                 shapes: Mapping[str, Sequence[int]] | None = None, iterations: int = 200, warmup_ms: int = 500,
                 duration_s: float = 3, extra_args: Sequence[str] = (), trtexec: str | None = None, timeout_s: float = 3600):
        init_engine_options(self, path, precision, sparsity, engine_path, timing_cache, shapes)
        self.iterations = iterations
        self.warmup_ms = warmup_ms
        self.duration_s = duration_s
        self.extra_args = list(extra_args)
        self.trtexec = trtexec
        self.timeout_s = timeout_s

    def command(self, binary: str = "trtexec") -> list[str]:
        cmd = [binary]
        if self.engine_path and self.engine_path.exists():
            cmd.append(f"--loadEngine={self.engine_path}")
        else:
            cmd.append(f"--onnx={self.path}")
            if self.engine_path:
                cmd.append(f"--saveEngine={self.engine_path}")
            cmd += self.flags.trtexec_args()
            if self.timing_cache:
                cmd.append(f"--timingCacheFile={self.timing_cache}")
        if self.shapes:
            cmd.append("--shapes=" + ",".join(f"{k}:{'x'.join(str(int(d)) for d in v)}" for k, v in self.shapes.items()))
        cmd += [f"--iterations={self.iterations}", f"--warmUp={self.warmup_ms}", f"--duration={self.duration_s:g}",
                "--useSpinWait"]  # TRT >= 8.5 reports percentiles 90,95,99 by default
        return cmd + self.extra_args

    def run(self) -> dict:
        binary = find_trtexec(self.trtexec)
        cmd = self.command(binary)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise HeartError(f"trtexec timed out after {self.timeout_s:g} s: {' '.join(cmd)}") from exc
        text = (r.stdout or "") + (r.stderr or "")
        parsed = parse_trtexec_output(text)
        if r.returncode != 0 or parsed.get("passed") is False:
            raise HeartError(f"trtexec failed (exit {r.returncode}): {text.strip().splitlines()[-1] if text.strip() else ''}")
        parsed["command"] = cmd
        return parsed
