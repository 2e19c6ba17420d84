"""Bad input through the pipeline CLI: one clear line, exit 1, no traceback, inputs untouched, no partial outputs.
Also: the demo end to end at small settings (the README's main job)."""
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from heart_onnx.cli.main import main
from heart_onnx.errors import HeartError


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, demo_onnx_factory):
    """Dense demo ViT export, its sensitivities and a plan, made through the CLI."""
    d = tmp_path_factory.mktemp("pipe")
    onnx_path = demo_onnx_factory(d / "demo_vit.onnx")
    assert main(["analyze", "--model", "demo-vit", "--data", "digits", "-n", "32", "-o", str(d / "sens.npz")]) == 0
    assert main(["plan", str(d / "sens.npz"), "--budget", "0.02", "-o", str(d / "plan.json")]) == 0
    return d, onnx_path


def _one_line_error(capsys, rc):
    out, err = capsys.readouterr()
    assert rc == 1, (out, err)
    lines = [l for l in err.strip().splitlines() if l.strip() and not l.startswith("[W]")]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    return lines[0]


def test_plan_for_another_model_is_refused_and_input_untouched(pipeline, tmp_path, capsys):
    d, onnx_path = pipeline
    other = json.loads((d / "plan.json").read_text())
    other["fingerprint"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    before = _sha(onnx_path)
    line = _one_line_error(capsys, main(["prune", str(onnx_path), str(tmp_path / "other.json"), "-o", str(tmp_path / "out.onnx")]))
    assert "another model" in line
    assert _sha(onnx_path) == before and not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("budget", ["-1", "nan", "1e9", "inf", "abc"])
def test_budget_out_of_range(pipeline, tmp_path, capsys, budget):
    d, _ = pipeline
    rc = main(["plan", str(d / "sens.npz"), "--budget", budget, "-o", str(tmp_path / "p.json")])
    if budget == "abc":  # not a number: argparse usage error
        assert rc == 2 or rc == 1
        capsys.readouterr()
    else:
        assert "budget" in _one_line_error(capsys, rc)
    assert not (tmp_path / "p.json").exists()


def test_output_equal_to_input_is_refused(pipeline, capsys):
    d, onnx_path = pipeline
    before = _sha(onnx_path)
    line = _one_line_error(capsys, main(["prune", str(onnx_path), str(d / "plan.json"), "-o", str(onnx_path)]))
    assert "same" in line or "input" in line
    assert _sha(onnx_path) == before


def test_cli_user_error_prints_no_traceback_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not an onnx model at all")
    r = subprocess.run([sys.executable, "-m", "heart_onnx", "prune", str(bad), str(tmp_path / "p.json"), "-o",
                        str(tmp_path / "o.onnx")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len([l for l in r.stderr.splitlines() if l.strip()]) == 1, r.stderr


def test_interrupted_prune_leaves_no_partial_output(pipeline, tmp_path, monkeypatch):
    d, onnx_path = pipeline
    from heart_onnx.plan import Plan
    from heart_onnx.surgery.api import prune

    real_write = Path.write_bytes

    def half_then_interrupt(self, data):
        real_write(self, data[: len(data) // 2])  # half the bytes reach the disk...
        raise KeyboardInterrupt  # ...then the user presses Ctrl-C

    monkeypatch.setattr(Path, "write_bytes", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prune(onnx_path, Plan.load(d / "plan.json"), tmp_path / "out.onnx")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file


def test_checkpoints_load_with_weights_only(tmp_path):
    from heart_onnx.models import zoo

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(HeartError):
        zoo.load_local(path, family="vit_timm")


def test_plans_and_sensitivities_are_not_pickles(pipeline, tmp_path):
    d, _ = pipeline
    json.loads((d / "plan.json").read_text())  # plain JSON
    with np.load(d / "sens.npz", allow_pickle=False) as z:  # loads without pickles
        assert all(z[k].dtype != object for k in z.files)
    from heart_onnx.sensitivities import Sensitivities

    np.savez(tmp_path / "obj.npz", __meta__=np.array([{"a": 1}], dtype=object))
    with pytest.raises(HeartError):
        Sensitivities.load(tmp_path / "obj.npz")


def test_demo_end_to_end_small(tmp_path, capsys):
    rc = main(["demo", "-o", str(tmp_path / "demo"), "--json", "--calib", "32", "--finetune-epochs", "1", "--no-cnn",
               "--budgets", "0.05", "--bench-batch", "8"])
    out, _ = capsys.readouterr()
    assert rc == 0
    summary = json.loads(out)
    rows = summary["vit"]["rows"]
    assert rows and all(r["max_abs_diff"] < 1e-4 for r in rows)  # surgery == masked reference
    assert all(abs(r["acc_pruned"] - r["extra"]["masked_accuracy"]) < 1e-9 for r in rows)
    assert all(0 < r["flops_ratio"] <= 1 for r in rows)
    assert (tmp_path / "demo" / "report.md").read_text().count("|") > 20
    assert (tmp_path / "demo" / "pareto.png").stat().st_size > 1000
