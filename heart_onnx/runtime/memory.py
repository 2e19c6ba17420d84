"""Peak memory during a window: host RSS sampled in a thread (Linux /proc), CUDA from torch."""
from __future__ import annotations

import os
import threading

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except Exception:  # noqa: BLE001
            return None


def peak_rss_bytes() -> int | None:
    """This process's RSS high-water mark: Linux ``VmHWM`` (exact, and unlike ``ru_maxrss`` not carried over
    ``exec`` from the parent that started it); ``ru_maxrss`` where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # noqa: BLE001
        return None


def reset_peak_rss() -> bool:
    """Reset the high-water mark (:func:`peak_rss_bytes`) to the current RSS (Linux: write 5 to
    ``/proc/self/clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: ``peak_rss_mb`` (host, sampled every ``interval_s``, default 5 ms) and
    ``peak_cuda_mb`` (``torch.cuda.max_memory_allocated`` when ``cuda`` is True, else None)."""

    def __init__(self, interval_s: float = 0.005, cuda: bool = False):
        self.interval_s = interval_s
        self.cuda = cuda
        self.peak_rss = 0
        self.peak_cuda_mb: float | None = None
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            r = rss_bytes()
            if r and r > self.peak_rss:
                self.peak_rss = r
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self.peak_rss = rss_bytes() or 0
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self._stop.clear()
        self._t = threading.Thread(target=self._loop, daemon=True, name="peak-memory")
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join(timeout=2)
        r = rss_bytes()
        if r and r > self.peak_rss:
            self.peak_rss = r
        if self.cuda:
            import torch

            self.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss / 2**20
