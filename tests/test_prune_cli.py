"""CLI prune/verify end to end, and the errors a user can make (one line, exit 1)."""
import json

import onnx
import torch

from heart_onnx.cli.main import main
from heart_onnx.models.export import export

from _surgery_util import make, plan_for


def test_prune_then_verify_cli(tmp_path, capsys):
    m, a = make("timm_vit")
    export(m, a.example_inputs(2), tmp_path / "m.onnx")
    plan = plan_for(m, a, heads={0: (1,), 2: (0, 1)}, stages=((1, a.seq_len - 6),), fuse=True)
    plan.save(tmp_path / "plan.json")
    torch.save(m, tmp_path / "w.pt")  # a whole module (3 layers, not the zoo default)
    rc = main(["prune", str(tmp_path / "m.onnx"), str(tmp_path / "plan.json"), "-o", str(tmp_path / "p.onnx"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["heads_removed"] == 3 and (tmp_path / "p.onnx").is_file()
    onnx.checker.check_model(onnx.load(tmp_path / "p.onnx"), full_check=True)
    rc = main(["verify", str(tmp_path / "p.onnx"), "--weights", str(tmp_path / "w.pt"),
               "--plan", str(tmp_path / "plan.json"), "-n", "1", "--json"])
    cap = capsys.readouterr()
    assert cap.out, cap.err
    res = json.loads(cap.out)
    assert rc == 0 and res["passed"] and res["max_abs"] <= res["tol"]


def test_prune_refuses_other_model_and_same_output(tmp_path, capsys):
    m, a = make("timm_vit")
    export(m, a.example_inputs(2), tmp_path / "m.onnx")
    other, _ = make("timm_vit", seed=3)
    plan_for(other, a, heads={0: (1,)}).save(tmp_path / "plan.json")
    rc = main(["prune", str(tmp_path / "m.onnx"), str(tmp_path / "plan.json"), "-o", str(tmp_path / "p.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and "another model" in err and len(err.strip().splitlines()) == 1
    plan_for(m, a, heads={0: (1,)}).save(tmp_path / "plan2.json")
    rc = main(["prune", str(tmp_path / "m.onnx"), str(tmp_path / "plan2.json"), "-o", str(tmp_path / "m.onnx")])
    assert rc == 1 and "same as" in capsys.readouterr().err
    assert not (tmp_path / "p.onnx").exists()
