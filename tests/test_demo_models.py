"""The embedded demo models: shipped weights reach the recorded accuracy; the training script works."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from heart_onnx.errors import HeartError
from heart_onnx.models import demo

ROOT = Path(__file__).resolve().parents[1]
META = json.loads((demo.WEIGHTS_DIR / demo.META_FILE).read_text())


def _train_script():
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "scripts" / "train_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _manual_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return sum(int(model(x[i:i + 1]).argmax(-1).item() == int(y[i])) for i in range(len(x)))


@pytest.mark.parametrize("name,factory", [("vit", demo.demo_vit), ("cnn", demo.demo_cnn)])
def test_shipped_weights_reach_recorded_accuracy(name, factory):
    rec = META[name]
    path = demo.WEIGHTS_DIR / rec["weights"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == rec["sha256"]
    assert path.stat().st_size < 4 * 2**20  # a few MB at most
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = factory()
    assert not model.training
    assert set(state) == set(model.state_dict())
    _, _, x_te, y_te = demo.digits_split()
    correct = _manual_accuracy(model, x_te, y_te)  # one image at a time: independent of batching
    assert correct == rec["test_correct"] and rec["n_test"] == len(y_te) == 450
    assert correct / 450 == pytest.approx(rec["test_accuracy"]) and correct / 450 >= 0.97
    assert demo.accuracy(model, x_te, y_te) == pytest.approx(correct / 450)


def test_meta_records_split_and_versions():
    assert META["split"] == demo.DEMO_SPLIT
    assert META["seed"] == 0 and META["torch"] and META["input"]["shape"] == [None, 1, 8, 8]
    for name in ("vit", "cnn"):
        assert META[name]["epochs"] >= 1 and META[name]["parameters"] > 0
    assert demo.demo_meta() == META


def test_demo_vit_geometry_and_fused_attention_equivalence():
    timm = pytest.importorskip("timm")
    model = demo.demo_vit()
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    assert model.patch_embed.num_patches == 16 and model.num_prefix_tokens == 1
    assert len(model.blocks) == demo.VIT_CONFIG["depth"] and model.blocks[0].attn.num_heads == demo.VIT_CONFIG["num_heads"]
    assert all(not b.attn.fused_attn for b in model.blocks)
    assert sum(p.numel() for p in model.parameters()) == META["vit"]["parameters"]
    x = torch.randn(5, *demo.INPUT_SHAPE)
    with torch.no_grad():
        ref = model(x)
        for b in model.blocks:
            b.attn.fused_attn = True
        fused = model(x)
    assert ref.shape == (5, 10)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    tokens = model.forward_features(x)
    assert tokens.shape == (5, 17, demo.VIT_CONFIG["embed_dim"])


def test_demo_vit_double_backward():
    """HVPs need double backward through attention on CPU (explicit softmax path)."""
    model = demo.demo_vit()
    x = torch.randn(3, *demo.INPUT_SHAPE)
    params = [model.head.weight]
    loss = model(x).logsumexp(-1).mean()
    (g,) = torch.autograd.grad(loss, params, create_graph=True)
    v = torch.randn_like(g)
    (hv,) = torch.autograd.grad((g * v).sum(), params)
    assert torch.isfinite(hv).all() and hv.abs().sum() > 0


def test_demo_cnn_structure():
    tv = pytest.importorskip("torchvision")
    model = demo.demo_cnn()
    blocks = [m for m in model.modules() if isinstance(m, tv.models.resnet.BasicBlock)]
    assert len(blocks) == 3
    for b in blocks:
        for attr in ("conv1", "bn1", "relu", "conv2", "bn2", "downsample"):
            assert hasattr(b, attr)
    assert blocks[0].downsample is None and blocks[1].downsample is not None
    assert sum(p.numel() for p in model.parameters()) == META["cnn"]["parameters"]
    # forward equals a hand-written composition of its parts
    x = torch.randn(4, *demo.INPUT_SHAPE)
    with torch.no_grad():
        h = torch.relu(model.bn1(model.conv1(x)))
        for b in blocks:
            idt = b.downsample(h) if b.downsample is not None else h
            h = torch.relu(b.bn2(b.conv2(torch.relu(b.bn1(b.conv1(h))))) + idt)
        ref = model.fc(h.mean((2, 3)))
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_weights_errors(tmp_path):
    with pytest.raises(HeartError, match="not found"):
        demo.demo_vit(weights=tmp_path / "missing.pt")
    torch.save(demo.demo_cnn().state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(HeartError, match="do not fit"):
        demo.demo_vit(weights=tmp_path / "cnn.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(HeartError, match="cannot read"):
        demo.demo_cnn(weights=tmp_path / "junk.pt")
    random_vit = demo.demo_vit(pretrained=False)
    assert not random_vit.training
    assert not torch.equal(random_vit.head.weight, demo.demo_vit().head.weight)


# ---------------------------------------------------------------------------------- training script
def test_random_shift_matches_loop_reference():
    td = _train_script()
    x = torch.randn(6, 2, 5, 7)
    out = td.random_shift(x, torch.Generator().manual_seed(3), max_shift=1)
    gen = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 3, (6,), generator=gen)
    dx = torch.randint(0, 3, (6,), generator=gen)
    for b in range(6):
        ref = torch.full((2, 7, 9), td.BACKGROUND)
        ref[:, 1:6, 1:8] = x[b]
        torch.testing.assert_close(out[b], ref[:, dy[b]:dy[b] + 5, dx[b]:dx[b] + 7], atol=0, rtol=0)
    assert torch.equal(td.random_shift(x, torch.Generator(), max_shift=0), x)


def test_train_classifier_one_epoch_tiny_vit():
    td = _train_script()
    x_tr, y_tr, _, _ = demo.digits_split()
    x, y = x_tr[:192], y_tr[:192]

    def tiny():
        torch.manual_seed(0)
        return demo.build_vit(embed_dim=16, depth=1, num_heads=2)

    def loss_of(m):
        with torch.no_grad():
            return float(nn.functional.cross_entropy(m.eval()(x), y))

    a, b = tiny(), tiny()
    before = loss_of(a)
    info = td.train_classifier(a, x, y, epochs=1, lr=5e-3, warmup=0, batch_size=32, seed=0)
    td.train_classifier(b, x, y, epochs=1, lr=5e-3, warmup=0, batch_size=32, seed=0)
    assert info["epochs"] == 1 and not a.training
    assert loss_of(a) < before  # it learned something in 6 steps
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na  # seeded: bit-identical reruns


def test_train_script_main_writes_loadable_weights(tmp_path):
    td = _train_script()
    assert td.main(["--out", str(tmp_path), "--models", "cnn", "--cnn-epochs", "1", "--log-every", "0"]) == 0
    meta = json.loads((tmp_path / "demo.json").read_text())
    model = demo.demo_cnn(weights=tmp_path / "demo_cnn.pt")
    _, _, x_te, y_te = demo.digits_split()
    assert meta["cnn"]["test_correct"] == round(demo.accuracy(model, x_te, y_te) * 450)
    assert meta["cnn"]["sha256"] == hashlib.sha256((tmp_path / "demo_cnn.pt").read_bytes()).hexdigest()
    assert meta["split"] == demo.DEMO_SPLIT and "vit" not in meta
    x_va, y_va = demo.digits_val()
    assert meta["cnn"]["n_val"] == 300 and meta["cnn"]["val_accuracy"] == pytest.approx(demo.accuracy(model, x_va, y_va))
