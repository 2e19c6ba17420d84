"""Accumulate sensitivities over calibration batches with torch.distributed (torchrun; gloo on CPU, NCCL on GPU).

Batch ``i`` of the calibration list goes to rank ``i % world_size``; its random probes are seeded from
``(seed, i)``, never from the rank, so the result does not depend on the number of processes. Sums
(mean scores, curves, ridge statistics, quality) are all-reduced in float64; per-input arrays are
gathered and put back in batch order. With no process group (or ``world_size == 1``) every helper is
the identity, so the same code runs single-process.

    torchrun --nproc-per-node 2 -m heart_onnx analyze --model demo-vit --data digits -o sens.npz
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch


_OWNED = False  # init_from_env created the default process group (finish() tears it down)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

    ``backend`` default: ``"nccl"`` when CUDA is available, else ``"gloo"``. Returns False (and does
    nothing) when not launched by torchrun or already initialised. On CUDA each rank uses ``LOCAL_RANK``.
    """
    import torch.distributed as dist

    if dist.is_initialized() or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    global _OWNED
    _OWNED = True
    return True


def owns_group() -> bool:
    """True while the process group :func:`init_from_env` created is up."""
    return _OWNED and _dist() is not None


def finish() -> bool:
    """Barrier, then destroy the process group :func:`init_from_env` created; False (no-op) if there is none.

    A process that ran collectives should then end with ``os._exit`` rather than interpreter
    finalization: Gloo's worker threads drop their last tensor references (which needs the GIL) after a
    collective completes, and a thread that meets a finalizing interpreter is killed inside a noexcept
    destructor, so the process aborts (SIGABRT, "terminate called without an active exception") after
    its work is done and saved (torch 2.14, about 1 run in 3 on 2 cores).
    """
    global _OWNED
    if not owns_group():
        return False
    d = _dist()
    d.barrier()
    d.destroy_process_group()
    _OWNED = False
    return True


def shard(n: int) -> list[int]:
    """Global batch indices this rank processes (``i % world == rank``)."""
    r, w = rank_world()
    return list(range(r, n, w))


def all_reduce_sum(a: np.ndarray) -> np.ndarray:
    """Sum of ``a`` (float64) over ranks; identity single-process. Uses the device of the NCCL group."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return np.asarray(a, dtype=np.float64)
    dev = torch.device("cuda", torch.cuda.current_device()) if d.get_backend() == "nccl" else torch.device("cpu")
    t = torch.as_tensor(np.asarray(a, dtype=np.float64)).to(dev)
    d.all_reduce(t, op=d.ReduceOp.SUM)
    return t.cpu().numpy()


def gather_indexed(items: Sequence[tuple[int, Any]]) -> list[Any]:
    """All ranks' ``(global_index, value)`` pairs -> values of every rank, sorted by index (on every rank)."""
    d = _dist()
    allitems = list(items)
    if d is not None and d.get_world_size() > 1:
        parts: list = [None] * d.get_world_size()
        d.all_gather_object(parts, list(items))
        allitems = [x for p in parts for x in p]
    return [v for _, v in sorted(allitems, key=lambda t: t[0])]
