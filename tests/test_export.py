"""ONNX export (heart_onnx.models.export): every family, both exporters, run in ONNX Runtime against PyTorch."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from heart_onnx.errors import HeartError
from heart_onnx.models import export as ex
from heart_onnx.models import registry, zoo

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("timm")
pytest.importorskip("transformers")

# name -> (builder, kwargs, seq_len for text models)
MODELS = {
    "timm_vit": (zoo.tiny_vit, {}),
    "timm_deit_distilled": (zoo.tiny_deit, {}),
    "hf_vit": (zoo.tiny_hf_vit, {}),
    "hf_deit": (zoo.tiny_hf_deit, {}),
    "pythia": (zoo.tiny_pythia, {}),
    "bert": (zoo.tiny_bert, {}),
    "bert_encoder": (zoo.tiny_bert, {"num_labels": None}),
    "resnet_cifar": (zoo.tiny_resnet, {}),
    "resnet_bottleneck": (zoo.tiny_resnet, {"kind": "bottleneck"}),
    "mobilenetv2": (zoo.tiny_mobilenetv2, {}),
    "mobilenetv2_timm": (zoo.tiny_mobilenetv2, {"source": "timm"}),
}
# the dynamo exporter costs ~10 s of CPU per model (torch.export tracing and decompositions), so one model
# per family and implementation runs it: timm ViT, HF ViT/DeiT, GPT-NeoX, BERT, ResNet
DYNAMO = ["timm_vit", "hf_deit", "pythia", "bert", "resnet_cifar"]
EXTERNAL = {("timm_vit", "dynamo"), ("resnet_cifar", "torchscript")}  # these cases write external data
SEQ = 8
CASES = [(n, "torchscript") for n in MODELS] + [(n, "dynamo") for n in DYNAMO]
_EXPORTED: dict[tuple[str, str], str] = {}  # (name, exporter) -> path, reused by later tests


def _feed(x) -> dict[str, np.ndarray]:
    if isinstance(x, dict):
        return {k: v.numpy() for k, v in x.items()}
    return {"pixel_values": x.numpy()}


def _check(sess, adapter, x) -> float:
    with torch.no_grad():
        ref = adapter.forward(x).numpy()
    out = sess.run(None, _feed(x))[0]
    assert out.shape == ref.shape
    err = float(np.abs(out - ref).max())
    scale = float(np.abs(ref).max())
    assert err <= 1e-4 * scale + 1e-7, f"max abs diff {err:.3g} at output scale {scale:.3g}"
    return err


@pytest.mark.parametrize("name,exporter", CASES)
def test_export_matches_pytorch(name, exporter, tmp_path):
    fn, kw = MODELS[name]
    model = fn(**kw)
    a = registry.adapt(model)
    external = (name, exporter) in EXTERNAL
    path = ex.export(model, a.example_inputs(1, SEQ), tmp_path / f"{name}.onnx", exporter=exporter,
                     external_data=external)
    assert path == tmp_path / f"{name}.onnx" and path.is_file()
    files = [f"{name}.onnx"] + ([f"{name}.onnx.data"] if external else [])
    assert sorted(os.listdir(tmp_path)) == files  # no temporary files left behind
    if external:
        raw = onnx.load(str(path), load_external_data=False)
        locs = {e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"}
        assert locs == {f"{name}.onnx.data"}
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["heart_onnx.exporter"] == exporter and m.producer_name == "heart-onnx"
    assert exporter in m.producer_version
    assert meta["heart_onnx.fingerprint"] == ex.fingerprint(model)
    opset = {o.domain: o.version for o in m.opset_import}[""]
    assert opset == ex.DEFAULT_OPSET[exporter]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    text = a.family in ("gpt_neox", "bert")
    assert [i.name for i in sess.get_inputs()] == (["input_ids", "attention_mask"] if text else ["pixel_values"])
    out_name = "last_hidden_state" if a.kind == "encoder" else "logits"
    assert [o.name for o in sess.get_outputs()] == [out_name] == [meta["heart_onnx.outputs"]]
    assert sess.get_inputs()[0].shape[0] == "batch"  # dynamic batch
    errs = []
    for batch in (1, 3):  # the export traced batch 2: both are other sizes
        x = a.example_inputs(batch, SEQ)
        if text and batch == 3:
            x["attention_mask"][1, SEQ - 3:] = 0  # padding is a real input, not a baked constant
        errs.append(_check(sess, a, x))
    print(f"{name} {exporter}: max abs diff {max(errs):.3g}")
    _EXPORTED[(name, exporter)] = str(path)


def test_dynamo_graph_has_static_sequence_and_torchscript_reads_shape(tmp_path):
    """DESIGN facts: dynamo makes the sequence length a constant; batch stays dynamic for both exporters."""
    a = registry.adapt(zoo.tiny_pythia())
    for exporter in ("dynamo", "torchscript"):
        p = _EXPORTED.get(("pythia", exporter))
        if p is None:
            p = ex.export(a.model, a.example_inputs(1, SEQ), tmp_path / f"p_{exporter}.onnx", exporter=exporter)
        m = onnx.load(str(p))
        dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["batch", SEQ]
        if exporter == "dynamo":  # the sequence length is baked into Reshape constants: another length fails
            sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            with pytest.raises(Exception):
                sess.run(None, _feed(a.example_inputs(1, SEQ + 2)))
        else:  # TorchScript computes it from Shape
            assert any(n.op_type == "Shape" for n in m.graph.node)


def test_static_batch(tmp_path):
    model = zoo.tiny_vit()
    a = registry.adapt(model)
    p = ex.export(model, a.example_inputs(2), tmp_path / "s.onnx", exporter="torchscript", dynamic_batch=False)
    sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [2, 3, 32, 32] and sess.get_outputs()[0].shape == [2, 10]
    _check(sess, a, a.example_inputs(2))


def test_external_data_written_atomically(tmp_path, monkeypatch):
    model = zoo.tiny_resnet()
    a = registry.adapt(model)
    out = tmp_path / "sub" / "ext.onnx"
    monkeypatch.setattr(ex, "EXTERNAL_DATA_BYTES", 10_000)  # automatic choice: this model counts as "large"
    p = ex.export(model, a.example_inputs(1), out, exporter="torchscript")
    assert sorted(os.listdir(out.parent)) == ["ext.onnx", "ext.onnx.data"]
    m = onnx.load(str(p), load_external_data=False)
    locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    assert locs == {"ext.onnx.data"}
    sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    _check(sess, a, a.example_inputs(3))
    # re-export without external data removes the stale data file
    ex.export(model, a.example_inputs(1), out, exporter="torchscript", external_data=False)
    assert sorted(os.listdir(out.parent)) == ["ext.onnx"]


class _Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: neither exporter can capture both branches
            return self.lin(x)
        return {"not": "a tensor"}


def test_export_errors_leave_nothing_behind(tmp_path):
    target = tmp_path / "x.onnx"
    target.write_bytes(b"old")
    with pytest.raises(HeartError):
        ex.export(_Broken(), -torch.ones(1, 4), target, exporter="torchscript")
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["x.onnx"]
    with pytest.raises(HeartError, match="unknown exporter"):
        ex.export(zoo.tiny_vit(), torch.randn(1, 3, 32, 32), tmp_path / "y.onnx", exporter="tensorflow")
    with pytest.raises(HeartError, match=".onnx"):
        ex.export(zoo.tiny_vit(), torch.randn(1, 3, 32, 32), tmp_path / "y.bin")
    with pytest.raises(HeartError, match="tensor"):
        ex.export(zoo.tiny_vit(), [np.zeros((1, 3, 32, 32))], tmp_path / "y.onnx")
    assert sorted(os.listdir(tmp_path)) == ["x.onnx"]


def test_export_restores_training_mode_and_names(tmp_path):
    model = zoo.tiny_vit().train()
    ex.export(model, torch.randn(1, 3, 32, 32), tmp_path / "t.onnx", exporter="torchscript")
    assert model.training
    assert ex.input_names_for({"input_ids": torch.zeros(1, 2, dtype=torch.long)}) == ["input_ids"]
    assert ex.input_names_for(torch.zeros(1, 2, dtype=torch.long)) == ["input_ids"]
    assert ex.input_names_for(torch.zeros(1, 3, 4, 4)) == ["pixel_values"]


def test_gpt_neox_torchscript_without_mask_is_a_clear_error(tmp_path):
    model = zoo.tiny_pythia()
    with pytest.raises(HeartError, match="attention_mask"):
        ex.export(model, {"input_ids": torch.randint(0, 128, (1, SEQ))}, tmp_path / "n.onnx", exporter="torchscript")
    assert os.listdir(tmp_path) == []
    # an adapter is accepted in place of the model
    a = registry.adapt(model)
    p = ex.export(a, a.example_inputs(1, SEQ), tmp_path / "a.onnx", exporter="torchscript")
    _check(ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]), a, a.example_inputs(2, SEQ))
