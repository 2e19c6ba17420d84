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


def test_demo_vit_accuracy_pruned_onnx_equals_masked(tmp_path):
    """Demo ViT (shipped weights): held-out accuracy (digits test split, 450 images) of the pruned ONNX
    model equals the masked PyTorch model's; predictions agree on every image."""
    import numpy as np
    import onnxruntime as ort
    import pytest

    from heart_onnx.errors import HeartError
    from heart_onnx.models import demo
    from heart_onnx.models.masking import apply_plan
    from heart_onnx.models.registry import adapt
    from heart_onnx.surgery.api import prune

    try:
        m = demo.demo_vit()
    except HeartError as exc:
        pytest.skip(f"demo weights not available: {exc}")
    a = adapt(m)
    _, _, x, y = demo.digits_split()
    export(m, x[:2], tmp_path / "d.onnx")
    H, N = a.num_heads, a.seq_len
    plan = plan_for(m, a, heads={0: (0,), 1: (H - 1,)}, stages=((0, max(a.prefix_tokens + 1, N - N // 3)),), fuse=True)
    out = prune(tmp_path / "d.onnx", plan, tmp_path / "p.onnx")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 150].numpy()})[0] for i in range(0, len(x), 150)])
    with torch.no_grad(), apply_plan(a, plan):
        ref = torch.cat([a.forward(x[i:i + 150]) for i in range(0, len(x), 150)]).numpy()
    acc_onnx = float((got.argmax(-1) == y.numpy()).mean())
    acc_ref = float((ref.argmax(-1) == y.numpy()).mean())
    assert acc_onnx == acc_ref
    assert (got.argmax(-1) == ref.argmax(-1)).all()
