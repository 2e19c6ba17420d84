"""Runners, the timing protocol, comparison, benchmark API and ``heart-onnx bench`` on small ONNX graphs
built with onnx.helper (numpy is the independent reference)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from heart_onnx.cli.main import main
from heart_onnx.errors import HeartError, MissingDependency
from heart_onnx.runtime import timing as timing_mod
from heart_onnx.runtime.api import bare_ort_loop, benchmark, benchmark_pair
from heart_onnx.runtime.compare import compare_outputs
from heart_onnx.runtime.inputs import parse_shapes, random_feed
from heart_onnx.runtime.ort import OrtRunner
from heart_onnx.runtime.timing import interleaved, time_fn


def mlp_onnx(path, width=64, depth=2, seed=0, batch_dim="batch"):
    """y = relu(...relu(x @ W0 + b0)...) @ W_last; returns the weights for a numpy reference."""
    rng = np.random.default_rng(seed)
    ws = [(rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32) for _ in range(depth)]
    bs = [rng.standard_normal(width).astype(np.float32) for _ in range(depth)]
    nodes, inits, cur = [], [], "x"
    for i, (w, b) in enumerate(zip(ws, bs)):
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        out = "y" if i == depth - 1 else f"r{i}"
        nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        cur = out
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return ws, bs


def mlp_ref(x, ws, bs):
    for w, b in zip(ws, bs):
        x = np.maximum(x @ w + b, 0)
    return x


@pytest.fixture()
def mlp(tmp_path):
    p = tmp_path / "mlp.onnx"
    return p, *mlp_onnx(p)


# ------------------------------------------------------------------ runners
def test_ort_runner_matches_numpy_and_is_lazy(mlp, tmp_path):
    path, ws, bs = mlp
    OrtRunner(tmp_path / "missing.onnx")  # constructing touches nothing
    r = OrtRunner(path, threads=1)
    assert r.session is None
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    with pytest.raises(HeartError, match="not active"):
        r.infer({"x": x})
    with r:
        assert r.is_active and r.session is not None
        out = r.infer({"x": x})
        specs = r.input_specs()
    assert not r.is_active and r.session is None
    np.testing.assert_allclose(out["y"], mlp_ref(x, ws, bs), rtol=1e-5, atol=1e-5)
    assert specs[0].name == "x" and specs[0].shape == ("batch", 64)
    with pytest.raises(HeartError, match="not found"):
        with OrtRunner(tmp_path / "missing.onnx"):
            pass


def test_missing_backends_name_what_to_install(mlp):
    path = mlp[0]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(MissingDependency, match="onnxruntime-gpu"):
            with OrtRunner(path, provider="cuda"):
                pass
    with pytest.raises(HeartError, match="TensorRT"):
        OrtRunner(path, provider="cpu", precision="fp16")
    from heart_onnx._deps import available
    from heart_onnx.runtime.trt import TrtRunner

    if not available("tensorrt"):
        with pytest.raises(MissingDependency, match=r"heart-onnx\[trt\]"):
            with TrtRunner(path, precision="fp16"):
                pass


@pytest.mark.trt
def test_trt_runner_fp32_matches_numpy(mlp, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on this machine (needs an NVIDIA GPU)")
    from heart_onnx.runtime.trt import TrtRunner

    path, ws, bs = mlp
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    with TrtRunner(path, engine_path=tmp_path / "m.engine", timing_cache=tmp_path / "t.cache", shapes={"x": (2, 64)}) as r:
        out = r.infer({"x": x})
    np.testing.assert_allclose(out["y"], mlp_ref(x, ws, bs), rtol=1e-3, atol=1e-3)
    assert (tmp_path / "m.engine").exists() and (tmp_path / "t.cache").exists()


def test_torch_runner_matches_module():
    import torch

    from heart_onnx.runtime.torch_runner import TorchRunner

    lin = torch.nn.Linear(8, 3)
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    built = []
    with TorchRunner(lambda: built.append(1) or lin, device="cpu") as r:
        out = r.infer({"input": x})
    assert built == [1]
    with torch.no_grad():
        ref = lin(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(out["output0"], ref, rtol=1e-6)


# ------------------------------------------------------------------ timing protocol
def test_time_fn_statistics_with_a_fake_clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timing_mod.time, "perf_counter", lambda: now[0])
    durations = iter([9.0] * 3 + [0.001 * (i + 1) for i in range(20)])  # 3 warm-up calls, then 1..20 ms

    def fn():
        now[0] += next(durations)

    synced = []
    t = time_fn(fn, warmup=3, repeats=20, sync=lambda: synced.append(1), batch=4)
    ref = np.arange(1, 21, dtype=float)
    assert t.repeats == 20 and len(synced) == 23
    assert t.median_ms == pytest.approx(np.percentile(ref, 50))
    assert t.p90_ms == pytest.approx(np.percentile(ref, 90)) and t.p99_ms == pytest.approx(np.percentile(ref, 99))
    assert t.throughput == pytest.approx(4 * 20 / (ref.sum() / 1e3))
    assert t.windows[0][1] - t.windows[0][0] == pytest.approx(0.001)
    with pytest.raises(HeartError):
        time_fn(fn, repeats=0)


def test_interleaved_alternates_and_keeps_per_function_timings():
    order = []
    ts = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=1, repeats=4)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert ts["a"].repeats == ts["b"].repeats == 4


# ------------------------------------------------------------------ comparison
def test_compare_outputs_numbers_and_truthiness():
    e = np.array([[1.0, -2.0], [4.0, 0.5]], np.float32)
    a = e + np.array([[0.0, 1e-3], [-2e-3, 0.0]], np.float32)
    r = compare_outputs({"y": a}, {"y": e}, atol=1e-2, rtol=0)
    assert r and r.passed
    assert r.max_abs == pytest.approx(2e-3, rel=1e-3)
    assert r.mean_abs == pytest.approx(np.abs(a - e).mean(), rel=1e-3)
    assert r.max_rel == pytest.approx(np.max(np.abs(a - e) / np.abs(e)), rel=1e-3)
    assert not compare_outputs([a], [e], atol=1e-4, rtol=0)
    bad = compare_outputs({"y": a[:1]}, {"y": e})
    assert not bad and "shape" in str(bad)
    assert not compare_outputs({}, {"y": e})
    assert "PASS" in str(r) and r.to_dict()["outputs"][0]["name"] == "y"


# ------------------------------------------------------------------ inputs
def test_random_feed_and_shapes():
    from heart_onnx.runtime.base import TensorSpec

    specs = [TensorSpec("input_ids", ("batch", "seq"), np.dtype(np.int64)), TensorSpec("attention_mask", ("batch", "seq"), np.dtype(np.int64)),
             TensorSpec("pixel", (1, 3, 4, 4), np.dtype(np.float32))]
    with pytest.raises(HeartError, match="--shape input_ids"):
        random_feed(specs, batch=1)
    f = random_feed(specs, batch=1, dims={"seq": 7})
    assert f["input_ids"].shape == (1, 7) and (f["attention_mask"] == 1).all() and f["pixel"].shape == (1, 3, 4, 4)
    with pytest.raises(HeartError, match="static batch"):
        random_feed(specs, batch=2, dims={"seq": 7})
    assert parse_shapes(["x:2x3", "a:b:1x4"]) == {"x": (2, 3), "a:b": (1, 4)}
    with pytest.raises(HeartError):
        parse_shapes(["x:2xN"])


# ------------------------------------------------------------------ benchmark API and CLI
def test_benchmark_records_everything(mlp):
    path = mlp[0]
    r = benchmark(path, batch=3, warmup=2, repeats=7, threads=1, power="none")
    assert r.shapes == {"x": [3, 64]} and r.timing["repeats"] == 7 and r.timing["batch"] == 3
    assert r.timing["median_ms"] > 0 and r.timing["p90_ms"] >= r.timing["median_ms"] * 0.999
    assert r.energy is None and r.power["available"] is False and r.power["reason"]
    v = r.environment["versions"]
    assert v["onnxruntime"] and v["numpy"] and r.environment["cpu"]
    assert r.protocol["warmup"] == 2
    json.dumps(r.to_dict())


def test_benchmark_pair_ratio_wide_margin(tmp_path):
    light, heavy = tmp_path / "light.onnx", tmp_path / "heavy.onnx"
    mlp_onnx(light, width=64, depth=1)
    mlp_onnx(heavy, width=512, depth=6)
    res = benchmark_pair(heavy, light, batch=16, warmup=3, repeats=15, threads=1, power="none")
    # 6 layers of 512x512 vs 1 layer of 64x64: ~380x the FLOPs; assert only a wide margin
    assert res["ratio"] > 3
    assert res["a"].protocol["interleaved"] and res["b"].shapes == {"x": [16, 64]}


def test_benchmark_pair_sessions_do_not_spin(tmp_path, monkeypatch):
    """Interleaved ORT CPU sessions are made without spinning thread pools; a lone runner keeps ORT's default."""
    from heart_onnx.runtime import api

    path = tmp_path / "m.onnx"
    mlp_onnx(path, width=32, depth=1)
    made = []
    real = api.make_runner

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(api, "make_runner", spy)
    benchmark_pair(path, path, batch=2, warmup=1, repeats=2, threads=1, power="none")
    assert len(made) == 2 and all(r.spinning is False for r in made)
    with OrtRunner(path, spinning=False) as r:
        assert r.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with OrtRunner(path) as r, pytest.raises(RuntimeError):  # no entry: ORT's default (spinning)
        r.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


def test_harness_overhead_wide_margin(tmp_path):
    """The harness's median is close to a bare InferenceSession.run loop (2% in the benchmark; 25% here)."""
    path = tmp_path / "m.onnx"
    mlp_onnx(path, width=384, depth=4)
    x = np.random.default_rng(0).standard_normal((16, 384)).astype(np.float32)
    bare, ours = [], []
    for _ in range(3):  # alternate blocks so drifts of a shared machine hit both
        bare.append(float(np.median(bare_ort_loop(path, {"x": x}, warmup=5, repeats=30, threads=1))))
        with OrtRunner(path, threads=1) as r:
            ours.append(time_fn(lambda: r.infer({"x": x}), warmup=5, repeats=30).median_ms)
    assert min(ours) <= 1.25 * min(bare), (ours, bare)


def test_cli_bench_json_compare_and_errors(mlp, tmp_path, capsys):
    path = mlp[0]
    other = tmp_path / "other.onnx"
    mlp_onnx(other, depth=1, seed=1)
    assert main(["bench", str(path), "--json", "--repeats", "5", "--warmup", "1", "--threads", "1", "--power", "none",
                 "-o", str(tmp_path / "r.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "ort-cpu" and out["timing"]["repeats"] == 5
    assert json.loads((tmp_path / "r.json").read_text())["model"] == str(path)
    assert main(["bench", str(path), "--compare", str(other), "--repeats", "5", "--warmup", "1", "--batch", "2", "--power", "none"]) == 0
    text = capsys.readouterr().out
    assert "speed-up B vs A" in text and "batch 2" in text
    assert main(["bench", str(tmp_path / "nope.onnx")]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["bench", str(path), "--backend", "ort-cuda", "--power", "none"]) in (0, 1)


def test_engine_shapes_resolved_for_tensorrt(mlp):
    from heart_onnx.runtime.api import _engine_shapes

    path = mlp[0]
    assert _engine_shapes(path, "trt", 4, None, None) == {"x": (4, 64)}
    assert _engine_shapes(path, "ort-cpu", 4, None, None) is None


def test_peak_rss_tracks_an_allocation_and_resets():
    """The kernel high-water mark sees a 64 MiB buffer that is gone again, and a reset brings it back down."""
    from heart_onnx.runtime.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs (not Linux)")
    before = peak_rss_bytes()
    buf = np.ones(64 * 2**20, dtype=np.uint8)  # touched pages: resident
    del buf
    high = peak_rss_bytes()
    assert high >= before + 60 * 2**20 and rss_bytes() < high
    assert reset_peak_rss() and peak_rss_bytes() < high
