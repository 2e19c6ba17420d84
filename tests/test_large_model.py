"""An ONNX model over 2 GB (external data) through ``heart-onnx inspect`` and ``heart-onnx prune``.

The model is a real timm ViT (3 blocks, width 3936, 8 heads of 492, 16x16 images in 8x8 patches -> 5
tokens) with 558.7 M parameters = 2.23 GB (2.08 GiB) of float32 weights, random init, exported by
``heart_onnx.models.export.export`` (dynamo), which writes the weights to ``big.onnx.data`` because they
are over 2 GB. The plan removes one head in two layers and keeps 3 of 5 tokens after block 1, so the
pruned model is still over 2 GiB and must be written with external data too.

Checks: inspect counts exactly the model's parameters and finds 3 blocks x 8 heads; prune writes an
``.onnx`` + ``.onnx.data`` pair whose data is over 2 GiB; ``onnx.checker.check_model`` by path and
``onnx_io.load_model`` accept it; ONNX Runtime on it equals the PyTorch model masked by the same plan
(computed before pruning, on fresh random inputs); the input files are byte-identical afterwards.
Memory: the PyTorch model is freed before the prune, so the test process holds at most the ONNX side.
"""
import gc
import hashlib
import json
import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

DIM, HEADS, DEPTH = 3936, 8, 3


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _big_vit():
    """The wide ViT with random weights, initialised in one pass (timm's truncated-normal init is slow at this size)."""
    from heart_onnx.models import zoo

    with torch.device("meta"):
        m = zoo.tiny_vit(depth=DEPTH, dim=DIM, heads=HEADS, img=16, patch=8, num_classes=10)
    m = m.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("weight") and p.dim() == 1:  # LayerNorm scale
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.normal_(0.0, 0.02, generator=g)
    assert not list(m.buffers())
    return m.eval()


def _available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return float("inf")


@pytest.fixture
def big_dir(tmp_path):
    """``tmp_path``, emptied afterwards even on failure (pytest keeps old tmp_paths: 4.4 GB each here)."""
    yield tmp_path
    for p in tmp_path.iterdir():
        if p.is_file():
            p.unlink()


@pytest.mark.skipif(_available_gb() < 10, reason="needs about 9 GB of free RAM (peak 8.0 GB measured)")
def test_over_2gb_through_inspect_and_prune(big_dir, capsys):
    tmp_path = big_dir
    from heart_onnx.cli.main import main
    from heart_onnx.models.export import export, read_metadata
    from heart_onnx.models.masking import apply_plan
    from heart_onnx.models.registry import adapt
    from heart_onnx.plan import Plan, TokenStage

    t0 = time.perf_counter()
    m = _big_vit()
    a = adapt(m)
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params * 4 > 2**31  # over 2 GiB of float32
    t_build = time.perf_counter() - t0

    src = tmp_path / "big.onnx"
    t0 = time.perf_counter()
    export(m, a.example_inputs(2), src)
    t_export = time.perf_counter() - t0
    # the plan carries the export's fingerprint (the weight hash export just computed: not hashed a third time)
    heads = {0: (1,), 2: (5,)}
    plan = Plan(fingerprint=read_metadata(src)["heart_onnx.fingerprint"], family=a.family, geometry=a.geometry(),
                heads=heads, tokens=(TokenStage(1, 3),), prefix_tokens=a.prefix_tokens)
    plan.save(tmp_path / "plan.json")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad(), apply_plan(a, plan, check=False) as masked:
        ref = masked.forward(x).numpy()  # (3, 10)
    del m, a, masked
    gc.collect()
    data = tmp_path / "big.onnx.data"
    assert data.stat().st_size > 2**31 and src.stat().st_size < 2**24  # the weights are in the .data file
    before = {p.name: _sha(p) for p in (src, data)}

    assert main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == n_params
    assert [(b["heads"], b["head_dim"], b["seq_len"]) for b in info["attention"]] == [(HEADS, DIM // HEADS, 5)] * DEPTH

    out = tmp_path / "pruned.onnx"
    t0 = time.perf_counter()
    assert main(["prune", str(src), str(tmp_path / "plan.json"), "-o", str(out), "--json"]) == 0, capsys.readouterr().err
    t_prune = time.perf_counter() - t0
    capsys.readouterr()
    out_data = tmp_path / "pruned.onnx.data"
    assert out_data.stat().st_size > 2**31 and out.stat().st_size < 2**24
    removed = sum(len(v) for v in heads.values()) * 4 * DIM * (DIM // HEADS) + 2 * (DIM // HEADS)  # q, k, v, proj (+ biases)
    assert out_data.stat().st_size < data.stat().st_size - removed * 4 * 0.99

    import onnx

    from heart_onnx.onnx_io import load_model

    onnx.checker.check_model(str(out))  # by path: the data is read beside it
    proto = load_model(out, load_external=False)  # sizes of every external tensor checked, then the checker
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    del proto

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    del sess
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max())), np.abs(got - ref).max()

    assert {p.name: _sha(p) for p in (src, data)} == before  # inputs untouched
    print(f"\nbuild {t_build:.1f} s, export {t_export:.1f} s, prune {t_prune:.1f} s")
