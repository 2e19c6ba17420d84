"""A wheel installed into a fresh environment carries the prebuilt JupyterLab extension and enables the
server extension: `jupyter labextension list` and `jupyter server extension list` show them.

The fresh venv reuses this environment's dependencies through a .pth file (so the test does not
reinstall torch), but heart-onnx itself and its data files come only from the wheel.
"""
import os
import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if not (REPO / "heart_onnx" / "labextension" / "package.json").exists():
        pytest.fail("heart_onnx/labextension is not built: run 'bash .ci/setup'")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=600)
    (whl,) = out.glob("heart_onnx-*.whl")
    return whl


def test_wheel_installs_lab_and_server_extensions(wheel, tmp_path):
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # dependencies from this environment, appended after the fresh site-packages
    deps = [p for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]) if p]
    (site / "zz_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    env["PATH"] = f"{env_dir / 'bin'}:{env.get('PATH', '')}"
    # heart_onnx must come from the fresh install, not the source tree
    where = subprocess.check_output([str(py), "-c", "import heart_onnx; print(heart_onnx.__file__)"], text=True, env=env, cwd=tmp_path)
    assert str(env_dir) in where, where
    lab = subprocess.run([str(py), "-m", "jupyterlab.labextensions", "list"], capture_output=True, text=True, env=env, cwd=tmp_path)
    text = re.sub(r"\x1b\[[0-9;]*m", "", lab.stdout + lab.stderr)
    assert re.search(rf"{re.escape(str(env_dir))}.*labextensions", text, re.S), text
    assert re.search(r"heart-onnx v0\.1\.0\s+enabled\s+OK", text), text
    srv = subprocess.run([str(py), "-m", "jupyter_server.extension.serverextension", "list"], capture_output=True, text=True, env=env, cwd=tmp_path)
    text = re.sub(r"\x1b\[[0-9;]*m", "", srv.stdout + srv.stderr)
    assert re.search(r"heart_onnx\.jupyter\s+enabled", text), text
    assert re.search(r"heart_onnx\.jupyter\s+OK", text), text
