"""Power and energy: samplers that run beside a timed window, and the integration of their samples.

Sources, in the order ``auto_sampler`` tries them:

- ``jtop`` (jetson-stats) on Jetson: ``jetson.power["tot"]["power"]`` (mW) and each rail;
- ``tegrastats`` on Jetson when jtop is missing: a subprocess whose lines are parsed by
  ``parse_tegrastats_line`` (board input ``VDD_IN`` on Xavier/Orin NX/Orin Nano, ``POM_5V_IN`` on
  Nano/TX2, the sum of the module rails on AGX Orin, which has no input rail);
- NVML on desktop/server GPUs: ``nvmlDeviceGetPowerUsage`` (mW, the GPU board only);
- none on a plain CPU host: ``NullSampler`` says why, and energy is reported as unavailable.

Energy over a window is the trapezoidal integral of total power, linearly interpolated at the
window's ends; over many short windows (interleaved timing) it is the sum over the windows.
"""
from __future__ import annotations

import bisect
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable, Sequence

from .._deps import available, require
from ..errors import HeartError


@dataclass(frozen=True)
class PowerSample:
    t: float  # time.perf_counter() when the sample was taken (or arrived)
    total_mw: float
    rails_mw: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- tegrastats parsing
# "VDD_IN 5263mW/5263mW" (JetPack 5/6), "POM_5V_IN 1750/1628" and "VDD_IN 6140/5510" (JetPack 4):
# current/average in mW, with or without the unit. RAM/SWAP/IRAM pairs end in MB/kB and never match.
_RAIL = re.compile(r"(?<![\w@])([A-Z][A-Z0-9_]*)\s+(\d+(?:\.\d+)?)(?:mW)?/(\d+(?:\.\d+)?)(?:mW)?(?=\s|$)")
_STAMP = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%")
_TEMP = re.compile(r"\b(\w+)@(-?\d+(?:\.\d+)?)C\b")
# rails that measure the whole module/board input, in order of preference
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


@dataclass(frozen=True)
class TegrastatsLine:
    rails_mw: dict[str, float]  # instantaneous power per rail
    rails_avg_mw: dict[str, float]  # tegrastats' own running average per rail
    total_mw: float | None  # board input rail, or the sum of rails when there is none
    total_source: str  # "VDD_IN", "POM_5V_IN", "sum:VDD_GPU_SOC+..." or "none"
    timestamp: datetime | None  # JetPack >= 5 prefixes each line with MM-DD-YYYY HH:MM:SS
    ram_used_mb: int | None = None
    gpu_util_pct: int | None = None
    temps_c: dict[str, float] = field(default_factory=dict)


def parse_tegrastats_line(line: str) -> TegrastatsLine:
    """Parse one tegrastats line of any JetPack (4.x, 5.x, 6.x) format."""
    rails: dict[str, float] = {}
    avgs: dict[str, float] = {}
    for name, cur, avg in _RAIL.findall(line):
        if name in ("RAM", "SWAP", "IRAM"):
            continue
        rails[name] = float(cur)
        avgs[name] = float(avg)
    total: float | None = None
    source = "none"
    for r in INPUT_RAILS:
        if r in rails:
            total, source = rails[r], r
            break
    if total is None and rails:
        total = float(sum(rails.values()))
        source = "sum:" + "+".join(rails)
    ts = None
    m = _STAMP.match(line)
    if m:
        ts = datetime.strptime(m.group(1), "%m-%d-%Y %H:%M:%S")
    ram = _RAM.search(line)
    gpu = _GR3D.search(line)
    temps = {k: float(v) for k, v in _TEMP.findall(line) if float(v) > -100}  # -256C = sensor absent
    return TegrastatsLine(
        rails, avgs, total, source, ts, int(ram.group(1)) if ram else None, int(gpu.group(1)) if gpu else None, temps,
    )


# ---------------------------------------------------------------- integration
def integrate_energy(samples: Sequence[PowerSample], t0: float, t1: float) -> float | None:
    """Joules drawn in [t0, t1]: trapezoid over total power, interpolated at both ends.

    Power is held constant before the first and after the last sample. None without samples.
    """
    if not samples or t1 <= t0:
        return None if not samples else 0.0
    ts = [s.t for s in samples]
    ps = [s.total_mw for s in samples]

    def p_at(t: float) -> float:
        i = bisect.bisect_left(ts, t)
        if i <= 0:
            return ps[0]
        if i >= len(ts):
            return ps[-1]
        ta, tb = ts[i - 1], ts[i]
        w = (t - ta) / (tb - ta) if tb > ta else 0.0
        return ps[i - 1] + w * (ps[i] - ps[i - 1])

    inner = [(t, p) for t, p in zip(ts, ps) if t0 < t < t1]
    pts = [(t0, p_at(t0)), *inner, (t1, p_at(t1))]
    mj = 0.0
    for (ta, pa), (tb, pb) in zip(pts, pts[1:]):
        mj += 0.5 * (pa + pb) * (tb - ta)  # mW * s = mJ
    return mj / 1e3


def energy_over_windows(samples: Sequence[PowerSample], windows: Iterable[tuple[float, float]]) -> float | None:
    """Sum of ``integrate_energy`` over several (start, end) windows (interleaved timing)."""
    if not samples:
        return None
    return float(sum(integrate_energy(samples, a, b) or 0.0 for a, b in windows))


# ---------------------------------------------------------------- samplers
class PowerSampler:
    """Context manager that samples power in a background thread while it is entered.

    ``available`` is False (with ``reason``) when the source cannot be read; ``samples`` holds
    ``PowerSample`` objects stamped with ``time.perf_counter()``.
    """

    source = "none"

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.samples: list[PowerSample] = []
        self.available = True
        self.reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # subclasses: _open(), _read() -> PowerSample | None, _close()
    def _open(self) -> None: ...

    def _read(self) -> PowerSample | None:
        return None

    def _close(self) -> None: ...

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                s = self._read()
            except Exception as exc:  # noqa: BLE001 - a sensor hiccup must not kill the benchmark
                self.reason = f"{self.source} read failed: {exc}"
                s = None
            if s is not None:
                with self._lock:
                    self.samples.append(s)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PowerSampler":
        if not self.available:
            return self
        self._open()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"power-{self.source}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._close()

    def energy(self, t0: float, t1: float) -> float | None:
        with self._lock:
            return integrate_energy(list(self.samples), t0, t1) if self.available else None

    def energy_windows(self, windows: Iterable[tuple[float, float]]) -> float | None:
        with self._lock:
            return energy_over_windows(list(self.samples), windows) if self.available else None

    def mean_power_w(self, t0: float | None = None, t1: float | None = None) -> float | None:
        with self._lock:
            ss = [s for s in self.samples if (t0 is None or s.t >= t0) and (t1 is None or s.t <= t1)] or list(self.samples)
        if not ss:
            return None
        return sum(s.total_mw for s in ss) / len(ss) / 1e3

    def rails_mean_w(self) -> dict[str, float]:
        with self._lock:
            ss = list(self.samples)
        out: dict[str, list[float]] = {}
        for s in ss:
            for k, v in s.rails_mw.items():
                out.setdefault(k, []).append(v)
        return {k: sum(v) / len(v) / 1e3 for k, v in out.items()}

    def describe(self) -> dict:
        return {"source": self.source, "available": self.available, "reason": self.reason, "samples": len(self.samples)}


class NullSampler(PowerSampler):
    """No power sensor (plain CPU host): energy is reported as unavailable, with the reason."""

    source = "none"

    def __init__(self, reason: str = "no power sensor on this host (no jtop, tegrastats or NVML)"):
        super().__init__()
        self.available = False
        self.reason = reason


class TegrastatsSampler(PowerSampler):
    """Runs ``tegrastats --interval MS`` and parses its lines (stamped on arrival).

    ``command`` (default ``"tegrastats"``) may name another binary, e.g. ``sudo tegrastats``:
    without root, JetPack 6 prints no power rails.
    """

    source = "tegrastats"

    def __init__(self, interval_s: float = 0.05, command: str | Sequence[str] = "tegrastats"):
        super().__init__(interval_s)
        self.command = [command] if isinstance(command, str) else list(command)
        self._proc: subprocess.Popen | None = None
        self.total_source = "none"
        if shutil.which(self.command[0]) is None:
            self.available = False
            self.reason = f"{self.command[0]} not found on PATH (it ships with JetPack on Jetson)"

    def feed_line(self, line: str, t: float | None = None) -> PowerSample | None:
        """Parse one line and keep it as a sample (used by the reader thread and by tests)."""
        parsed = parse_tegrastats_line(line)
        if parsed.total_mw is None:
            return None
        self.total_source = parsed.total_source
        s = PowerSample(time.perf_counter() if t is None else t, parsed.total_mw, parsed.rails_mw)
        with self._lock:
            self.samples.append(s)
        return s

    def _open(self) -> None:
        ms = max(1, int(round(self.interval_s * 1e3)))
        self._proc = subprocess.Popen(
            [*self.command, "--interval", str(ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )

    def _loop(self) -> None:  # line-driven, not polled
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if self._stop.is_set():
                break
            self.feed_line(line)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._proc = None
        if not self.samples and not self.reason:
            self.reason = "tegrastats printed no power rails (JetPack 6 shows them only to root: run with sudo or use jtop)"


class JtopSampler(PowerSampler):
    """jetson-stats: ``jtop().power`` -> {"rail": {name: {"power": mW, ...}}, "tot": {"power": mW}}."""

    source = "jtop"

    def __init__(self, interval_s: float = 0.1):
        super().__init__(interval_s)
        self._jtop = None
        if not available("jtop"):
            self.available = False
            self.reason = "jetson-stats is not installed: pip install 'heart-onnx[jetson]'"

    def _open(self) -> None:
        jtop_mod = require("jtop", "Jetson power sampling")
        self._jtop = jtop_mod.jtop(interval=max(self.interval_s, 0.1))
        self._jtop.start()

    @staticmethod
    def sample_from_power(power: dict, t: float) -> PowerSample | None:
        """Turn a ``jtop.power`` dict into a sample (total = ``tot``, else the sum of rails)."""
        rails = {k: float(v.get("power", 0.0)) for k, v in (power.get("rail") or {}).items() if isinstance(v, dict)}
        tot = power.get("tot") or {}
        total = float(tot["power"]) if isinstance(tot, dict) and "power" in tot else (sum(rails.values()) if rails else None)
        return None if total is None else PowerSample(t, total, rails)

    def _read(self) -> PowerSample | None:
        if self._jtop is None or not self._jtop.ok():
            return None
        return self.sample_from_power(self._jtop.power, time.perf_counter())

    def _close(self) -> None:
        if self._jtop is not None:
            self._jtop.close()
            self._jtop = None


class NvmlSampler(PowerSampler):
    """NVML board power of one GPU (``nvmlDeviceGetPowerUsage``, mW); the GPU only, not the host."""

    source = "nvml"

    def __init__(self, device_index: int = 0, interval_s: float = 0.02):
        super().__init__(interval_s)
        self.device_index = device_index
        self._nvml = None
        self._handle = None
        if not available("pynvml"):
            self.available = False
            self.reason = "nvidia-ml-py is not installed: pip install 'heart-onnx[nvml]'"
            return
        try:
            nvml = require("pynvml")
            nvml.nvmlInit()
            self._handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
            nvml.nvmlDeviceGetPowerUsage(self._handle)
            self._nvml = nvml
        except Exception as exc:  # noqa: BLE001 - NVMLError of any kind: no usable GPU
            self.available = False
            self.reason = f"NVML unavailable: {exc}"

    def _read(self) -> PowerSample | None:
        mw = float(self._nvml.nvmlDeviceGetPowerUsage(self._handle))
        return PowerSample(time.perf_counter(), mw, {f"gpu{self.device_index}": mw})

    def __del__(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass


def is_jetson() -> bool:
    from pathlib import Path

    return Path("/etc/nv_tegra_release").exists() or Path("/sys/module/tegra_fuse").exists()


def auto_sampler(kind: str = "auto", interval_s: float = 0.05, gpu_index: int = 0) -> PowerSampler:
    """The best available sampler. ``kind`` (default ``"auto"``): auto, jtop, tegrastats, nvml, none."""
    if kind not in ("auto", "jtop", "tegrastats", "nvml", "none"):
        raise HeartError(f"unknown power source {kind!r}: use auto, jtop, tegrastats, nvml or none")
    if kind == "none":
        return NullSampler("power sampling switched off (--power none)")
    if kind == "jtop":
        return JtopSampler(max(interval_s, 0.1))
    if kind == "tegrastats":
        return TegrastatsSampler(interval_s)
    if kind == "nvml":
        return NvmlSampler(gpu_index, interval_s)
    if is_jetson():
        s: PowerSampler = JtopSampler(max(interval_s, 0.1))
        if s.available:
            return s
        s = TegrastatsSampler(interval_s)
        if s.available:
            return s
    s = NvmlSampler(gpu_index, interval_s)
    if s.available:
        return s
    return NullSampler("no power sensor on this host: not a Jetson (jtop/tegrastats) and no NVML GPU; energy unavailable")
