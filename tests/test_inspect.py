"""inspect() and 'heart-onnx inspect': FLOPs against analytic counts, attention table, plan, CLI errors."""
from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
import torch

from heart_onnx.cli.main import main
from heart_onnx.graph_flops import graph_flops
from heart_onnx.inspect import inspect

from _onnx_models import FAMILIES, exported


def _vit_macs(n_tok: int, d: int, depth: int, mlp: int, patches: int, patch_in: int, classes: int) -> int:
    """Analytic MACs of a ViT: patch conv, per block qkv + q@k^T + p@v + proj + MLP, head."""
    block = n_tok * d * 3 * d + 2 * n_tok * n_tok * d + n_tok * d * d + 2 * n_tok * d * mlp
    return patches * d * patch_in + depth * block + d * classes


def _torch_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_tiny_vit_flops_params_attention(exporter):
    model, _, path = exported("timm_vit", exporter)
    info = inspect(path)
    want = _vit_macs(17, 32, 2, 128, 16, 3 * 8 * 8, 10)
    assert info["macs"] == want
    assert info["attention_macs"] == 2 * 2 * 17 * 17 * 32
    assert info["flops"]["mac_flops"] == 2 * want
    assert info["flops"]["total"] == 2 * want + info["flops"]["elementwise"]
    assert info["flops"]["by_op"]["MatMul"] > info["flops"]["by_op"]["Conv"] > 0
    assert info["flops"]["assumptions"] and "batch" in info["flops"]["assumptions"][0]  # dynamic batch -> 1
    # equal initializers may be de-duplicated by the exporter (zero biases): never more than torch has
    assert 0.9 * _torch_params(model) <= info["params"] <= _torch_params(model)
    assert info["exporter"] == exporter and info["opset"] in (17, 18)
    assert info["inputs"][0]["name"] == "pixel_values" and info["inputs"][0]["shape"][1:] == [3, 32, 32]
    assert info["attention"] == [{"layer": i, "heads": 4, "head_dim": 8, "seq_len": 17, "layout": "fused_timm",
                                  "hidden": 32, "norm": "pre"} for i in range(2)]
    assert info["plan"] is None
    json.dumps(info)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_table(family, capsys):
    _, _, path = exported(family, "torchscript")
    _, layers, heads, head_dim, seq, layout, _ = FAMILIES[family]
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [(a["heads"], a["head_dim"], a["seq_len"], a["layout"]) for a in info["attention"]] == \
        [(heads, head_dim, seq, layout)] * layers
    assert info["flops"]["unknown"] == []
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"attention  {layers} blocks" in out and "params" in out and "FLOPs" in out


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_pythia_flops_with_dims(exporter):
    model, adapter, path = exported("pythia", exporter)
    info = inspect(path)
    assert info["flops"]["unknown"] == []
    d, n, ff, vocab, layers = 32, 16, 64, adapter.vocab_size, 2
    block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * ff
    assert info["macs"] == layers * block + n * d * vocab


def test_vit_b16_geometry_matches_analytic(tmp_path):
    """ViT-B/16 at 224x224 (one block, to keep the test quick): every MatMul/Conv shape of the full model."""
    timm = pytest.importorskip("timm")
    from heart_onnx.models.export import export

    model = timm.create_model("vit_base_patch16_224", pretrained=False, depth=1).eval()
    p = export(model, torch.randn(1, 3, 224, 224), tmp_path / "vitb1.onnx", exporter="torchscript")
    rep = graph_flops(onnx.load(p))
    want = _vit_macs(197, 768, 1, 3072, 196, 3 * 16 * 16, 1000)
    assert abs(rep.macs - want) / want < 0.02
    full = _vit_macs(197, 768, 12, 3072, 196, 3 * 16 * 16, 1000)
    assert abs(full / 1e9 - 17.6) / 17.6 < 0.02  # the published ~17.6 GMACs
    info = inspect(p)
    assert info["attention"][0]["heads"] == 12 and info["attention"][0]["seq_len"] == 197


def test_plan_metadata_and_cnn(tmp_path, capsys):
    from heart_onnx.models import zoo
    from heart_onnx.models.export import export
    from heart_onnx.models.registry import adapt

    model = zoo.tiny_resnet()
    p = export(model, adapt(model).example_inputs(), tmp_path / "cnn.onnx", exporter="torchscript")
    assert main(["inspect", str(p)]) == 0
    assert "no attention blocks" in capsys.readouterr().out
    assert main(["inspect", str(p), "--require-attention"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no attention blocks" in err[0]
    m = onnx.load(p)
    plan = {"format": "heart-onnx-plan", "version": 1, "heads": {"0": [1, 2]}, "tokens": [], "merges": [],
            "budget": 0.05}
    m.metadata_props.add(key="heart_onnx.plan", value=json.dumps(plan))
    onnx.save(m, tmp_path / "with_plan.onnx")
    info = inspect(tmp_path / "with_plan.onnx")
    assert info["plan"] == plan and "heart_onnx.plan" not in info["metadata"]
    assert main(["inspect", str(tmp_path / "with_plan.onnx")]) == 0
    assert "2 heads removed" in capsys.readouterr().out
    n_conv = sum(isinstance(mod, torch.nn.Conv2d) for mod in model.modules())
    assert info["flops"]["by_op"]["Conv"] > 0 and n_conv > 0


@pytest.mark.parametrize("kind", ["missing", "directory", "text", "empty", "truncated", "random"])
def test_cli_bad_input_is_one_line(kind, tmp_path, capsys):
    _, _, good = exported("timm_vit", "torchscript")
    p = tmp_path / "bad.onnx"
    if kind == "directory":
        p = tmp_path
    elif kind == "text":
        p.write_text("not a model\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "truncated":
        p.write_bytes(good.read_bytes()[:5000])
    elif kind == "random":
        p.write_bytes(bytes(torch.randint(0, 256, (3000,), dtype=torch.uint8).tolist()))
    assert main(["inspect", str(p)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("heart-onnx inspect: error:")
    assert "Traceback" not in captured.err + captured.out


def test_cli_subprocess_no_traceback(tmp_path):
    p = tmp_path / "trunc.onnx"
    _, _, good = exported("timm_vit", "torchscript")
    p.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    r = subprocess.run([sys.executable, "-m", "heart_onnx", "inspect", str(p)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "truncated" in r.stderr or "corrupt" in r.stderr
