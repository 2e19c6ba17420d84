"""Start a real Jupyter server (or JupyterLab) on loopback for tests, with a token, in its own root dir."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyter_server(root: Path, app: str = "jupyter_server", timeout: float = 90.0) -> Iterator[tuple[str, str]]:
    """Yield (base_url, token) of a server serving ``root``; ``app`` is 'jupyter_server' or 'jupyterlab'."""
    port, token = free_port(), "heart-onnx-test-token"
    env = dict(os.environ, JUPYTER_TOKEN=token, PYTHONUNBUFFERED="1")
    env.pop("JUPYTER_CONFIG_DIR", None)
    cmd = [sys.executable, "-m", app, "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
           "--ServerApp.jpserver_extensions={'heart_onnx.jupyter': True}", "--allow-root"]
    log = open(root.parent / f"jupyter-{port}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    raise RuntimeError(f"jupyter server did not start: {(root.parent / f'jupyter-{port}.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
