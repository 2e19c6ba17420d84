"""``heart-onnx finetune``: accuracy recovers on a plan that hurts, the pruned structure is kept (the pruned
ONNX of the fine-tuned model equals the masked fine-tuned model), weights are a plain state dict, bad input
is one line and exit 1."""
import json

import numpy as np
import pytest
import torch

from heart_onnx.cli.main import main
from heart_onnx.models import demo
from heart_onnx.models.fingerprint import fingerprint
from heart_onnx.models.masking import apply_plan
from heart_onnx.models.registry import adapt
from heart_onnx.plan import Plan

from _surgery_util import plan_for


@pytest.fixture(scope="module")
def hurt(tmp_path_factory):
    """A plan on the shipped demo ViT that removes half the heads of every layer and prunes tokens."""
    d = tmp_path_factory.mktemp("ft")
    m = demo.demo_vit()
    a = adapt(m)
    H, N = a.num_heads, a.seq_len
    heads = {l: tuple(range(l % 2, H, 2)) for l in range(a.num_layers)}  # (H/2 per layer)
    plan = plan_for(m, a, heads=heads, stages=((1, N - N // 2),))
    plan.save(d / "plan.json")
    return d, m, plan


def _accuracy(model, plan, x, y):
    with torch.no_grad(), apply_plan(model, plan) as masked:
        return float((masked.forward(x).argmax(-1) == y).float().mean())


def test_finetune_cli_recovers_and_keeps_structure(hurt, tmp_path, capsys):
    import onnxruntime as ort

    d, m, plan = hurt
    _, _, x_test, y_test = demo.digits_split()
    before_ref = _accuracy(m, plan, x_test, y_test)
    dense_ref = float((m(x_test).argmax(-1) == y_test).float().mean())
    assert before_ref < dense_ref - 0.05  # the plan hurts
    rc = main(["finetune", "--model", "demo-vit", "--plan", str(d / "plan.json"), "--epochs", "1", "-n", "640",
               "-o", str(tmp_path / "ft.pt"), "--export", str(tmp_path / "ft.onnx"), "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    s = json.loads(cap.out)
    assert abs(s["before"]["accuracy"] - before_ref) < 1e-6 and abs(s["dense"]["accuracy"] - dense_ref) < 1e-6
    assert s["eval_data"] == "digits:test" and s["after"]["samples"] == len(y_test)
    assert s["after"]["accuracy"] >= s["before"]["accuracy"] + 0.05, s
    assert s["after"]["ce_loss"] < s["before"]["ce_loss"]

    # weights: a plain state dict, loadable with weights_only=True; the re-bound plan fits them
    sd = torch.load(tmp_path / "ft.pt", weights_only=True)
    ft = demo.demo_vit(pretrained=False)
    ft.load_state_dict(sd)
    ft.eval()
    ft_plan = Plan.load(tmp_path / "ft.plan.json")
    assert ft_plan.fingerprint == fingerprint(ft) != plan.fingerprint
    assert ft_plan.heads == plan.heads and ft_plan.tokens == plan.tokens
    assert abs(_accuracy(ft, ft_plan, x_test, y_test) - s["after"]["accuracy"]) < 1e-6

    # structure kept: the pruned ONNX (fewer heads in the graph) equals the masked fine-tuned model on fresh inputs
    from heart_onnx.inspect import inspect

    info = inspect(tmp_path / "ft.onnx")
    H = adapt(ft).num_heads
    assert [b["heads"] for b in info["attention"]] == [H - len(plan.heads[l]) for l in range(len(info["attention"]))]
    sess = ort.InferenceSession(str(tmp_path / "ft.onnx"), providers=["CPUExecutionProvider"])
    xr = torch.randn(16, *demo.INPUT_SHAPE)
    got = sess.run(None, {sess.get_inputs()[0].name: xr.numpy()})[0]
    with torch.no_grad(), apply_plan(ft, ft_plan) as masked:
        ref = masked.forward(xr).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert s["export"]["max_abs_diff_vs_masked"] < 1e-4
    assert abs(s["export"]["accuracy"] - s["after"]["accuracy"]) < 0.01

    # the removed heads contribute nothing: perturbing their q/k/v weights changes no masked output
    with torch.no_grad():
        qkv = ft.blocks[0].attn.qkv.weight  # (3*H*Dh, D)
        Dh = qkv.shape[0] // (3 * H)
        for h in plan.heads[0]:
            for part in range(3):
                qkv[part * H * Dh + h * Dh: part * H * Dh + (h + 1) * Dh] += 1.0
        with apply_plan(ft, ft_plan, check=False) as masked:
            assert np.abs(masked.forward(xr).numpy() - ref).max() < 1e-5


def _one_line(capsys, rc):
    out, err = capsys.readouterr()
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def test_finetune_cli_bad_inputs(hurt, tmp_path, capsys):
    d, m, plan = hurt
    base = ["finetune", "--model", "demo-vit", "--epochs", "1", "-n", "32"]
    assert "does not exist" in _one_line(capsys, main(base + ["--plan", str(tmp_path / "nope.json"), "-o", str(tmp_path / "a.pt")]))
    assert "--export" in _one_line(capsys, main(base + ["--plan", str(d / "plan.json"), "-o", str(tmp_path / "a.onnx")]))
    other = json.loads((d / "plan.json").read_text())
    other["fingerprint"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert "another model" in _one_line(capsys, main(base + ["--plan", str(tmp_path / "other.json"), "-o", str(tmp_path / "a.pt")]))
    assert "epochs" in _one_line(capsys, main(["finetune", "--model", "demo-vit", "--plan", str(d / "plan.json"),
                                               "--epochs", "0", "-o", str(tmp_path / "a.pt")]))
    line = _one_line(capsys, main(["finetune", "--weights", str(tmp_path / "missing.pt"), "--plan", str(d / "plan.json"),
                                   "-o", str(tmp_path / "a.pt")]))
    assert "missing.pt" in line
    assert not any(p.suffix in (".pt", ".onnx") for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:  # --plan is required: argparse usage error
        main(["finetune", "--model", "demo-vit", "-o", str(tmp_path / "a.pt")])
    assert e.value.code == 2


def test_finetune_language_model_dict_batches():
    """GPT-NeoX (dict inputs, (B, T, V) logits, no labels): distillation lowers the KL to the dense model, and
    the removed heads' interleaved q/k/v columns still contribute nothing."""
    from heart_onnx.data import load_data
    from heart_onnx.finetune import evaluate, finetune

    from _surgery_util import make

    m, a = make("pythia")
    plan = plan_for(m, a, heads={0: (1,), 2: (0, 2)})
    data = load_data("random", a, n=16, batch_size=8, seq_len=16)
    before = evaluate(a, plan, data, dense=a)
    res = finetune(m, plan, data, epochs=2, lr=1e-4)
    after = evaluate(res.model, res.plan, data, dense=a)
    assert before["accuracy"] is None and before["samples"] == 16
    assert after["kl_to_dense"] < 0.5 * before["kl_to_dense"]  # measured 1.2e-5 -> 3.3e-6
    ft = adapt(res.model)
    x = next(iter(data))[0]
    with torch.no_grad(), apply_plan(ft, res.plan) as masked:
        ref = masked.forward(x)  # (B, T, V)
        qkv = ft.role(2, "qkv").weight  # (3*H*Dh, D), interleaved per head
        for h in plan.heads[2]:
            qkv[ft.qkv_columns(h)] += 1.0
        assert torch.allclose(masked.forward(x), ref, atol=1e-5)
