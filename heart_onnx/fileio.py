"""Atomic output files: write to a temporary file beside the target, then rename over it.

An interrupted write never leaves a partial output, and an output path equal to an input path is refused.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import HeartError


def check_output_path(out: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse an output that would overwrite one of the inputs; create the parent directory."""
    out_p = Path(out)
    for inp in inputs:
        if inp is None:
            continue
        ip = Path(inp)
        if ip.exists() and out_p.exists() and os.path.samefile(ip, out_p) or out_p.resolve() == ip.resolve():
            raise HeartError(f"output path {out_p} is the same as input {ip}: choose another output (-o)")
    out_p.parent.mkdir(parents=True, exist_ok=True)
    return out_p


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success rename it onto ``target``.

    On any exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_p = Path(tmp)
    try:
        yield tmp_p
        os.replace(tmp_p, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_p.unlink()
        raise


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return Path(target)


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)
