"""onnx_io: one clear HeartError per bad file, never a crash or hang on garbage; atomic saves."""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from heart_onnx.errors import HeartError
from heart_onnx.onnx_io import load_model, save_model


def _mlp(d: int = 16, hidden: int = 64) -> onnx.ModelProto:
    rng = np.random.default_rng()
    w1 = rng.standard_normal((d, hidden)).astype(np.float32)
    w2 = rng.standard_normal((hidden, d)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ("batch", d))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ("batch", d))],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _run(m: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    src = m if isinstance(m, str) else m.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _err(path, **kw) -> str:
    with pytest.raises(HeartError) as ei:
        load_model(path, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_bad_paths_and_contents(tmp_path):
    assert "does not exist" in _err(tmp_path / "missing.onnx")
    assert "is a directory" in _err(tmp_path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "empty" in _err(tmp_path / "empty.onnx")
    (tmp_path / "text.onnx").write_text("this is a text file, not a model\n" * 10)
    assert "not an ONNX model" in _err(tmp_path / "text.onnx") or "not a valid" in _err(tmp_path / "text.onnx")
    (tmp_path / "rand.onnx").write_bytes(os.urandom(4096))
    _err(tmp_path / "rand.onnx")
    nograph = onnx.ModelProto()
    nograph.ir_version = 8
    (tmp_path / "nograph.onnx").write_bytes(nograph.SerializeToString())
    assert "no graph" in _err(tmp_path / "nograph.onnx")


def test_truncated_file(tmp_path):
    data = _mlp().SerializeToString()
    for frac in (0.05, 0.3, 0.6, 0.95, 0.999):
        p = tmp_path / f"t{frac}.onnx"
        p.write_bytes(data[: int(len(data) * frac)])
        msg = _err(p)
        assert "truncated" in msg or "corrupt" in msg or "not" in msg


def test_bad_opset_huge_dims_dangling_input(tmp_path):
    m = _mlp()
    m.opset_import[0].version = 999
    onnx.save(m, tmp_path / "op.onnx")
    assert "opset 999" in _err(tmp_path / "op.onnx")
    m = _mlp()
    m.graph.initializer[0].dims[0] = 10**13  # header claims 10^13 x 64 floats, data is 4 KB
    onnx.save(m, tmp_path / "huge.onnx")
    assert "w1" in _err(tmp_path / "huge.onnx")
    m = _mlp()
    m.graph.initializer[0].dims[0] = 17  # plausible dims, wrong data size
    onnx.save(m, tmp_path / "size.onnx")
    assert "w1" in _err(tmp_path / "size.onnx")
    m = _mlp()
    m.graph.node[1].input[0] = "nowhere"
    onnx.save(m, tmp_path / "dangle.onnx")
    assert "not a valid ONNX model" in _err(tmp_path / "dangle.onnx")


def test_external_data_missing_short_or_outside(tmp_path):
    m = _mlp()
    p = tmp_path / "ext.onnx"
    x = np.random.randn(3, 16).astype(np.float32)
    ref = _run(m, x)
    onnx.save(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    np.testing.assert_allclose(_run(load_model(p), x), ref, rtol=1e-6)
    loaded = load_model(p, load_external=False)  # structure only, files still checked
    assert any(t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer)
    data = (tmp_path / "ext.onnx.data").read_bytes()
    (tmp_path / "ext.onnx.data").write_bytes(data[: len(data) // 2])
    assert "too short" in _err(p)
    (tmp_path / "ext.onnx.data").unlink()
    assert "missing" in _err(p) and "ext.onnx.data" in _err(p)
    m2 = onnx.load(p, load_external_data=False)
    for t in m2.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    (tmp_path / "evil.onnx").write_bytes(m2.SerializeToString())
    assert "outside" in _err(tmp_path / "evil.onnx")


def test_fuzzed_files_only_raise_heart_error(tmp_path):
    """Hundreds of mutated files: each loads or fails with a HeartError; nothing else escapes."""
    rnd = random.Random(np.random.randint(1 << 30))
    data = _mlp().SerializeToString()
    outcomes = {"ok": 0, "error": 0}
    p = tmp_path / "fz.onnx"
    for i in range(300):
        b = bytearray(data)
        for _ in range(rnd.randint(1, 12)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        if i % 3 == 0:
            b = b[: rnd.randrange(1, len(b))]
        if i % 7 == 0:
            b = b + os.urandom(rnd.randrange(1, 64))
        p.write_bytes(bytes(b))
        try:
            load_model(p)
            outcomes["ok"] += 1
        except HeartError as exc:
            assert "\n" not in str(exc)
            outcomes["error"] += 1
    assert outcomes["error"] > 50


def test_load_never_modifies_input(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(_mlp(), p)
    before = hashlib.sha256(p.read_bytes()).hexdigest()
    m = load_model(p)
    save_model(m, tmp_path / "copy.onnx")
    assert hashlib.sha256(p.read_bytes()).hexdigest() == before


def test_save_roundtrip_atomic_and_refuses_input(tmp_path):
    m = _mlp()
    x = np.random.randn(2, 16).astype(np.float32)
    ref = _run(m, x)
    out = save_model(m, tmp_path / "sub" / "a.onnx")
    np.testing.assert_array_equal(_run(str(out), x), ref)
    size = m.ByteSize()
    out2 = save_model(m, tmp_path / "b.onnx", external_data=True)
    assert (tmp_path / "b.onnx.data").is_file()
    assert m.ByteSize() == size  # the caller's model still holds its weights
    assert all(t.data_location != TensorProto.EXTERNAL for t in m.graph.initializer)
    np.testing.assert_array_equal(_run(load_model(out2), x), ref)
    leftovers = [q for q in tmp_path.iterdir() if q.name.startswith(".")]
    assert leftovers == []
    with pytest.raises(HeartError, match="same as the input"):
        save_model(m, tmp_path / "b.onnx", source=tmp_path / "b.onnx")
    with pytest.raises(HeartError, match="directory"):
        save_model(m, tmp_path)
    unloaded = load_model(out2, load_external=False)
    with pytest.raises(HeartError, match="external data"):
        save_model(unloaded, tmp_path / "c.onnx")


def test_save_overwrites_atomically(tmp_path):
    p = tmp_path / "m.onnx"
    save_model(_mlp(d=8), p)
    m2 = _mlp(d=16)
    save_model(m2, p)
    x = np.random.randn(1, 16).astype(np.float32)
    np.testing.assert_array_equal(_run(str(p), x), _run(m2, x))
    assert sorted(q.name for q in Path(tmp_path).iterdir()) == ["m.onnx"]
