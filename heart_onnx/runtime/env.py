"""What every result records: device, library versions, and on Jetson the power mode and clocks.

``environment()`` never fails: anything it cannot read is recorded as ``None`` (or "unknown" with
the reason), because a benchmark result without its context is worse than one with a gap.
Power modes are only *switched* by ``set_power_mode``, which callers invoke behind an explicit flag.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from ..errors import HeartError

_LIBS = ("heart-onnx", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "transformers", "tensorrt", "polygraphy")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _LIBS:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (r.stdout or "") + (r.stderr or "")


def parse_nvpmodel_query(text: str) -> dict[str, str | int | None]:
    """Parse ``nvpmodel -q``: ``NV Power Mode: MAXN`` then the mode id on its own line."""
    name = None
    mode_id = None
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    if m:
        name = m.group(1)
        rest = text[m.end():]
        m2 = re.search(r"^\s*(\d+)\s*$", rest, re.M)
        if m2:
            mode_id = int(m2.group(1))
    return {"name": name, "id": mode_id}


def parse_jetson_clocks_show(text: str) -> bool | None:
    """True when ``jetson_clocks --show`` reports CPUs pinned (MinFreq == MaxFreq == CurrentFreq)."""
    cpus = re.findall(r"cpu\d+:.*?MinFreq=(\d+) MaxFreq=(\d+) CurrentFreq=(\d+)", text)
    if not cpus:
        return None
    return all(a == b == c for a, b, c in cpus)


def jetson_info() -> dict | None:
    """L4T release, nvpmodel mode and jetson_clocks state; None when not on a Jetson."""
    rel = Path("/etc/nv_tegra_release")
    if not rel.exists():
        return None
    info: dict = {"l4t": rel.read_text().splitlines()[0].strip() if rel.stat().st_size else None}
    q = _run(["nvpmodel", "-q"])
    info["power_mode"] = parse_nvpmodel_query(q) if q else {"name": None, "id": None, "reason": "nvpmodel not runnable"}
    show = _run(["jetson_clocks", "--show"])
    info["jetson_clocks"] = parse_jetson_clocks_show(show) if show else None
    try:
        info["model"] = Path("/proc/device-tree/model").read_text().strip("\x00\n ")
    except OSError:
        info["model"] = None
    return info


def gpu_name(index: int = 0) -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(index)
    except Exception:  # noqa: BLE001
        pass
    out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return out.strip().splitlines()[index] if out and out.strip() else None


def environment(backend: str | None = None) -> dict:
    """Host, CPU, GPU, library versions, thread settings and (on Jetson) power mode/clocks."""
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "gpu": gpu_name() if backend is None or not backend.endswith("cpu") else None,
        "versions": library_versions(),
        "jetson": jetson_info(),
    }


def power_mode_label(env: dict) -> str:
    j = env.get("jetson")
    if not j:
        return "n/a"
    pm = j.get("power_mode") or {}
    return str(pm.get("name") or pm.get("id") or "unknown")


def set_power_mode(mode: int | str, use_sudo: bool = True) -> str:
    """Switch the Jetson power mode with ``nvpmodel -m MODE``; returns the mode read back.

    Only call this behind an explicit user flag (``--set-power-mode``): it changes the device.
    """
    if Path("/etc/nv_tegra_release").exists() is False:
        raise HeartError("power modes can only be switched on a Jetson (nvpmodel): drop --set-power-mode")
    cmd = (["sudo", "-n"] if use_sudo and os.geteuid() != 0 else []) + ["nvpmodel", "-m", str(mode)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise HeartError(f"nvpmodel -m {mode} failed ({r.stderr.strip() or r.stdout.strip()}): run as root or allow passwordless sudo")
    q = _run(["nvpmodel", "-q"]) or ""
    return str(parse_nvpmodel_query(q).get("name") or mode)
