"""Surgery's memory-saving paths: streamed writes, light checks, weights kept in place, lazy constants."""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from heart_onnx import onnx_io
from heart_onnx.errors import HeartError
from heart_onnx.surgery import api
from heart_onnx.surgery.api import prune, prune_model
from heart_onnx.surgery.match import const_value, import_graph

from _surgery_util import exported, plan_for

_CACHE: dict = {}


def _run(path_or_proto, x):
    src = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_write_streamed_equals_serialize_to_string():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((40, 30)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 40])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 30])], inits, doc_string="d")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], producer_name="t")
    m.metadata_props.add(key="k", value="v" * 300)
    buf = io.BytesIO()
    n = onnx_io.write_streamed(m, buf)
    ref = m.SerializeToString()
    assert n == len(ref) and buf.getvalue() == ref
    empty = onnx.ModelProto(ir_version=8)
    buf = io.BytesIO()
    assert onnx_io.write_streamed(empty, buf) == len(empty.SerializeToString()) and buf.getvalue() == empty.SerializeToString()


def test_light_checker_on_load(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "LIGHT_CHECK_BYTES", 0)  # every model takes the big-model path
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 64])
    good = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w]),
                             opset_imports=[helper.make_opsetid("", 18)])
    onnx_io.save_model(good, tmp_path / "good.onnx")
    loaded = onnx_io.load_model(tmp_path / "good.onnx")
    assert numpy_helper.to_array(loaded.graph.initializer[0]).sum() == 64 * 64
    bad = helper.make_model(helper.make_graph([helper.make_node("NotAnOp", ["x", "w"], ["y"])], "g", [x], [y], [w]),
                            opset_imports=[helper.make_opsetid("", 18)])
    (tmp_path / "bad.onnx").write_bytes(bad.SerializeToString())
    with pytest.raises(HeartError, match="not a valid ONNX model"):
        onnx_io.load_model(tmp_path / "bad.onnx")


def test_const_value_does_not_cache_big_weights(tmp_path_factory):
    m, a, path = exported(tmp_path_factory, _CACHE, "timm_vit", "dynamo")
    graph = import_graph(onnx.load(str(path)))
    big = [t for t in graph.tensors().values() if type(t).__name__ == "Constant" and np.prod(t.shape) > 1 << 16]
    small = [t for t in graph.tensors().values() if type(t).__name__ == "Constant" and 1 < np.prod(t.shape) < 1 << 10]
    assert small
    for t in big + small[:3]:
        v = const_value(t)
        assert v is not None and tuple(v.shape) == tuple(t.shape)
    assert all(type(t._values).__name__ == "LazyValues" for t in big)


def test_prune_model_keeps_input_and_untouched_weights(tmp_path_factory, tmp_path):
    m, a, path = exported(tmp_path_factory, _CACHE, "timm_vit", "dynamo")
    src = onnx.load(str(path))
    before = src.SerializeToString()
    plan = plan_for(m, a, heads={0: [0, 1]}, stages=[(1, 10)])
    out = prune_model(src, plan)
    assert src.SerializeToString() == before  # the caller's proto is not modified
    orig = {t.name: t.raw_data for t in src.graph.initializer if np.prod(t.dims) > api.STUB_ELEMENTS}
    kept = {t.name: t.raw_data for t in out.graph.initializer if t.name in orig}
    assert kept and all(kept[k] == orig[k] for k in kept)  # untouched weights byte for byte
    onnx.checker.check_model(out, full_check=True)
    assert len(out.graph.value_info) > 0  # shape inference recorded
    prune(path, plan, tmp_path / "p.onnx")
    x = np.random.default_rng(3).standard_normal((2,) + tuple(a.example_inputs(1).shape[1:])).astype(np.float32)
    np.testing.assert_array_equal(_run(str(tmp_path / "p.onnx"), x), _run(out, x))


def test_failed_smoke_run_leaves_no_file(tmp_path_factory, tmp_path, monkeypatch):
    m, a, path = exported(tmp_path_factory, _CACHE, "timm_vit", "dynamo")
    plan = plan_for(m, a, heads={1: [0]})

    def boom(model, batch=2):
        raise HeartError("smoke run failed")

    monkeypatch.setattr(api, "smoke_run", boom)
    with pytest.raises(HeartError, match="smoke run failed"):
        prune(path, plan, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_check_light_full_check_sees_stubbed_shapes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 48])

    def model(rows: int):
        w = numpy_helper.from_array(np.ones((rows, 48), np.float32), "w")
        return helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w]),
                                 opset_imports=[helper.make_opsetid("", 18)])

    onnx_io.check_light(model(64), full_check=True)
    light = onnx_io.light_model(model(64), keep_elements=16, stub=True)
    assert light.graph.initializer[0].data_location == TensorProto.EXTERNAL and not light.graph.initializer[0].raw_data
    with pytest.raises(onnx.shape_inference.InferenceError, match="(?i)incompatible dimensions"):
        onnx_io.check_light(model(32), full_check=True)  # (b, 64) @ (32, 48): only the stub's dims tell
