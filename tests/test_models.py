"""Model adapters, zoo builders, local loading and fingerprints (heart_onnx.models)."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from heart_onnx.errors import HeartError
from heart_onnx.models import registry, zoo
from heart_onnx.models.base import ModelAdapter
from heart_onnx.models.fingerprint import fingerprint, weight_sha

pytest.importorskip("timm")
pytest.importorskip("transformers")

TRANSFORMERS = {
    # name: (builder, kwargs, family, kind, layers, heads, head_dim, hidden, seq_len, prefix)
    "timm_vit": (zoo.tiny_vit, {}, "vit", "classifier", 2, 4, 8, 32, 17, 1),
    "timm_deit": (zoo.tiny_deit, {}, "vit", "classifier", 2, 4, 8, 32, 18, 2),
    "timm_vit_3l": (zoo.tiny_vit, {"depth": 3, "dim": 48, "heads": 3}, "vit", "classifier", 3, 3, 16, 48, 17, 1),
    "hf_vit": (zoo.tiny_hf_vit, {}, "vit", "classifier", 2, 4, 8, 32, 17, 1),
    "hf_deit": (zoo.tiny_hf_deit, {}, "vit", "classifier", 2, 4, 8, 32, 18, 2),
    "hf_deit_teacher": (zoo.tiny_hf_deit, {"teacher": True}, "vit", "classifier", 2, 4, 8, 32, 18, 2),
    "pythia": (zoo.tiny_pythia, {}, "gpt_neox", "lm", 2, 4, 8, 32, None, 0),
    "bert_cls": (zoo.tiny_bert, {}, "bert", "classifier", 2, 4, 8, 32, None, 1),
    "bert": (zoo.tiny_bert, {"num_labels": None}, "bert", "encoder", 2, 4, 8, 32, None, 1),
}


def _build(name: str) -> tuple[nn.Module, ModelAdapter]:
    fn, kw = TRANSFORMERS[name][:2]
    model = fn(**kw)
    return model, registry.adapt(model)


# ------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformer_geometry(name):
    _, _, family, kind, layers, heads, hd, hidden, seq, prefix = TRANSFORMERS[name]
    model, a = _build(name)
    assert (a.family, a.kind, a.num_layers, a.num_heads, a.head_dim, a.hidden_size, a.seq_len, a.prefix_tokens) == \
        (family, kind, layers, heads, hd, hidden, seq, prefix)
    g = a.geometry()
    assert g["layers"] == layers and g["heads"] == heads and g["family"] == family
    # every named weight is the module at that path, with the expected shape
    ws = a.weights()
    per_block = 4 if family == "gpt_neox" or name.startswith("timm") else 6
    assert len(ws) == layers * per_block
    for n, m in ws.items():
        assert model.get_submodule(n) is m and isinstance(m, nn.Linear)
    for i in range(layers):
        proj = a.head_input_module(i)
        assert proj.in_features == heads * hd and proj.out_features == hidden
        assert proj in a.block_module(i).modules()
    pairs = a.channel_pairs()
    assert len(pairs) == layers
    for cp in pairs:
        prod, cons = model.get_submodule(cp.producer), model.get_submodule(cp.consumer)
        assert prod.out_features == cons.in_features == (4 * hidden if name.startswith("timm") else 64)
    # block outputs are (B, N, D)
    x = a.example_inputs(2, 7)
    outs = []
    h = a.block_module(layers - 1).register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        y = a.forward(x)
    h.remove()
    n_tok = seq if seq is not None else 7
    assert outs[0].shape == (2, n_tok, hidden)
    assert y.shape[0] == 2 and torch.isfinite(y).all()


# ------------------------------------------------------------------- attention probabilities, heads
def _capture_outputs(mods: dict[str, nn.Module]):
    got: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: got.__setitem__(k, o)) for k, m in mods.items()]
    return got, hooks


def _rotary(x: torch.Tensor, rd: int, base: float = 10000.0) -> torch.Tensor:
    """Independent rotary embedding on the first ``rd`` dims of (B, H, T, Dh)."""
    t = torch.arange(x.shape[-2], dtype=torch.float32)
    inv = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    ang = torch.cat([t[:, None] * inv, t[:, None] * inv], dim=-1)  # (T, rd)
    xr, xp = x[..., :rd], x[..., rd:]
    half = torch.cat([-xr[..., rd // 2:], xr[..., : rd // 2]], dim=-1)
    return torch.cat([xr * ang.cos() + half * ang.sin(), xp], dim=-1)


@pytest.mark.parametrize("name", ["timm_vit", "timm_deit", "hf_vit", "hf_deit", "pythia", "bert_cls"])
def test_attention_probs_and_head_layout(name):
    """attention_probs are softmax(q k^T / sqrt(Dh) + mask), recomputed here from the q/k/v projections;
    head h of head_input_module's input is probs_h @ v_h (columns h*Dh:(h+1)*Dh)."""
    model, a = _build(name)
    layer = 1
    H, Dh = a.num_heads, a.head_dim
    x = a.example_inputs(2, 9)
    if isinstance(x, dict):
        x["attention_mask"][1, 6:] = 0  # right padding in the second sequence
    roles = {}
    blk = a.block_module(layer)
    if name.startswith("timm"):
        roles = {"qkv": blk.attn.qkv}
    elif name == "pythia":
        roles = {"qkv": blk.attention.query_key_value}
    else:
        names = {"hf_vit": ("q_proj", "k_proj", "v_proj"), "hf_deit": ("q_proj", "k_proj", "v_proj")}.get(name)
        att = blk.attention if names else blk.attention.self
        names = names or ("query", "key", "value")
        roles = dict(zip("qkv", (getattr(att, n) for n in names)))
    got, hooks = _capture_outputs(roles)
    head_in = []
    hooks.append(a.head_input_module(layer).register_forward_pre_hook(lambda m, i: head_in.append(i[0])))
    with torch.no_grad(), a.attention_probs(layer) as cap:
        a.forward(x)
    for h in hooks:
        h.remove()
    probs, ctx = cap.value, head_in[0]  # (B, H, N, N), (B, N, H*Dh)
    B, N = ctx.shape[:2]

    def split(t):  # (B, N, H*Dh) -> (B, H, N, Dh)
        return t.reshape(B, N, H, Dh).transpose(1, 2)

    if name.startswith("timm"):
        q, k, v = (split(t) for t in got["qkv"].chunk(3, dim=-1))  # [q | k | v], head-major
    elif name == "pythia":
        qkv = got["qkv"].reshape(B, N, H, 3 * Dh)  # interleaved per head
        q, k, v = (t.transpose(1, 2) for t in qkv.split(Dh, dim=-1))
        # a.qkv_columns(h) is exactly head h's slice
        for h in range(H):
            assert torch.equal(got["qkv"][..., a.qkv_columns(h)], qkv[:, :, h])
        q, k = _rotary(q, a.rotary_ndims), _rotary(k, a.rotary_ndims)
    else:
        q, k, v = split(got["q"]), split(got["k"]), split(got["v"])
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)  # (B, H, N, N)
    if name == "pythia":
        causal = torch.ones(N, N, dtype=torch.bool).tril()
        keep = causal[None, None] & x["attention_mask"].bool()[:, None, None, :]
        scores = scores.masked_fill(~keep, float("-inf"))
    elif name.startswith("bert"):
        scores = scores.masked_fill(~x["attention_mask"].bool()[:, None, None, :], float("-inf"))
    ref = scores.softmax(-1)
    ref = torch.nan_to_num(ref)
    rows = slice(None) if name != "pythia" else slice(None)
    assert probs.shape == (B, H, N, N)
    if name == "pythia":  # padded query rows of a fully masked prefix are undefined: compare valid rows
        valid = x["attention_mask"].bool()
        torch.testing.assert_close(probs[0], ref[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(probs[1][:, valid[1]], ref[1][:, valid[1]], atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(probs[rows], ref[rows], atol=1e-6, rtol=1e-5)
    ctx_ref = (ref @ v).transpose(1, 2).reshape(B, N, H * Dh)
    if name == "pythia":
        valid = x["attention_mask"].bool()
        torch.testing.assert_close(ctx[0], ctx_ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ctx[1][valid[1]], ctx_ref[1][valid[1]], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(ctx, ctx_ref, atol=1e-5, rtol=1e-5)
    # HF: the same tensor the model itself reports with output_attentions=True
    if not name.startswith("timm"):
        kw = x if isinstance(x, dict) else {"pixel_values": x}
        with torch.no_grad():
            own = model(**kw, output_attentions=True).attentions[layer]
        torch.testing.assert_close(probs, own, atol=0, rtol=0)


def test_timm_attention_probs_restore_fused_flag():
    model = zoo.tiny_vit()
    model.blocks[0].attn.fused_attn = True
    a = registry.adapt(model)  # the adapter unfuses every block
    assert not any(b.attn.fused_attn for b in model.blocks)
    model.blocks[1].attn.fused_attn = True
    x = a.example_inputs(1)
    with torch.no_grad():
        fused = model(x)
        with a.attention_probs(1) as cap:
            unfused = model(x)
    assert model.blocks[1].attn.fused_attn  # restored
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cap.value.sum(-1), torch.ones(1, 4, 17))
    with pytest.raises(RuntimeError):
        _ = type(cap)().value


def test_hf_adapter_switches_sdpa_model_to_eager():
    import transformers as tf

    cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                       patch_size=8, num_labels=10, attn_implementation="sdpa")
    model = tf.ViTForImageClassification(cfg).eval()
    assert model.config._attn_implementation == "sdpa"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x).logits
    a = registry.adapt(model)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad(), a.attention_probs(0) as cap:
        after = a.forward(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cap.value.sum(-1), torch.ones(2, 4, 17))


def test_hvp_double_backward_through_attention():
    """Models built by the zoo support double backward (fused SDPA on CPU does not): grad of (g . v) exists."""
    for model in (zoo.tiny_vit(), zoo.tiny_pythia(), zoo.tiny_hf_vit()):
        a = registry.adapt(model)
        x = a.example_inputs(1, 5)
        params = [p for p in model.parameters() if p.requires_grad]
        out = a.forward(x).float().pow(2).mean()
        g = torch.autograd.grad(out, params, create_graph=True)
        gv = sum((gi * torch.ones_like(gi)).sum() for gi in g)
        hv = torch.autograd.grad(gv, params, allow_unused=True)
        assert any(h is not None and h.abs().sum() > 0 for h in hv)


# --------------------------------------------------------------------------------------------- CNN
CNNS = {
    "resnet_cifar": (zoo.tiny_resnet, {}, 3, ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]),
    "resnet_basic": (zoo.tiny_resnet, {"kind": "basic"}, 4, [f"layer{i}.0.conv1" for i in range(1, 5)]),
    "resnet_bottleneck": (zoo.tiny_resnet, {"kind": "bottleneck"}, 4,
                          [f"layer{i}.0.conv{j}" for i in range(1, 5) for j in (1, 2)]),
    "mobilenetv2": (zoo.tiny_mobilenetv2, {}, 5, ["features.4.conv.2", "features.5.conv.2"]),
    "mobilenetv2_timm": (zoo.tiny_mobilenetv2, {"source": "timm"}, 17, ["blocks.0.0.conv_pw", "blocks.6.0.conv_pwl"]),
}


@pytest.mark.parametrize("name", list(CNNS))
def test_cnn_geometry_and_pairs(name):
    fn, kw, blocks, producers = CNNS[name]
    model = fn(**kw)
    a = registry.adapt(model)
    assert a.family == "cnn" and a.kind == "classifier" and a.num_layers == blocks and a.num_heads == 0
    ws = a.weights()
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(ws) == sorted(convs)
    pairs = a.channel_pairs()
    assert [p.producer for p in pairs] == producers
    for cp in pairs:  # no pair goes into a grouped (depthwise) conv or out of one
        for n in (cp.producer, cp.consumer):
            m = model.get_submodule(n)
            assert not isinstance(m, nn.Conv2d) or m.groups == 1
    y = a.forward(a.example_inputs(2))
    assert y.shape == (2, 10)


def _channel_pair_cases():
    cases = [(n, kw) for n, kw in [("tiny_vit", {}), ("tiny_pythia", {}), ("tiny_bert", {}), ("tiny_hf_vit", {})]]
    cases += [(fn.__name__, kw) for fn, kw, _, _ in CNNS.values()]
    return cases


@pytest.mark.parametrize("builder,kw", _channel_pair_cases())
def test_channel_pairs_are_exactly_removable(builder, kw):
    """With the consumer's input channel c zeroed, nothing the producer writes to channel c (weights, bias,
    BatchNorm parameters in between) changes the output; without zeroing it does (the test can fail)."""
    torch.manual_seed(1)
    model = getattr(zoo, builder)(**kw)
    a = registry.adapt(model)
    x = a.example_inputs(2, 6)
    pairs = a.channel_pairs()
    assert pairs

    def perturb(cp, c):
        # a large positive shift keeps channel c above any ReLU/ReLU6 threshold, so the control below moves
        with torch.no_grad():
            prod = model.get_submodule(cp.producer)
            prod.weight[c] += 0.1 * torch.randn_like(prod.weight[c])
            if prod.bias is not None:
                prod.bias[c] += 20.0
            for bn_name in cp.between:
                bn = model.get_submodule(bn_name)
                bn.weight[c] += 0.5
                bn.bias[c] += 20.0
                bn.running_mean[c] -= 1.0

    with torch.no_grad():
        base = a.forward(x).clone()
    for cp in pairs:
        c = 1
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        perturb(cp, c)
        with torch.no_grad():
            moved = a.forward(x)
        assert (moved - base).abs().max() > 1e-6, f"perturbing {cp.producer} channel {c} had no effect"
        model.load_state_dict(saved)
        with torch.no_grad():
            model.get_submodule(cp.consumer).weight[:, c] = 0
            zeroed = a.forward(x).clone()
        perturb(cp, c)
        with torch.no_grad():
            after = a.forward(x)
        torch.testing.assert_close(after, zeroed, atol=1e-6, rtol=1e-6)
        model.load_state_dict(saved)


# ---------------------------------------------------------------------------------------- registry
def test_registry_rejects_unsupported_and_passes_adapters():
    with pytest.raises(HeartError, match="unsupported model"):
        registry.adapt(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(HeartError):
        registry.adapt("not a model")
    a = registry.adapt(zoo.tiny_vit())
    assert registry.adapt(a) is a


def test_build_names_and_errors():
    assert {"vit_b_16", "deit_b_16", "pythia-70m", "pythia-1.4b", "resnet56", "mobilenetv2", "tiny_vit"} <= set(zoo.names())
    m = zoo.build("tiny_vit", depth=3)
    assert len(m.blocks) == 3 and not m.training
    with pytest.raises(HeartError, match="unknown model"):
        zoo.build("vit_z_99")
    with pytest.raises(HeartError, match="unknown Pythia size"):
        zoo.pythia("7b")


# ------------------------------------------------------------------------------ published parameter counts
def _count_on_meta(fn, *args, **kw) -> int:
    with torch.device("meta"):
        m = fn(*args, **kw)
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("fn,args,expected", [
    (zoo.vit_ti_16, (), 5_717_416),
    (zoo.vit_s_16, (), 22_050_664),
    (zoo.vit_b_16, (), 86_567_656),   # timm vit_base_patch16_224: 86.6M
    (zoo.deit_b_16, (), 86_567_656),  # DeiT-B: 86.6M (paper table 1: 86M)
    (zoo.deit_b_16, (1000, True), 87_338_192),  # DeiT-B distilled: 87.3M
    (zoo.deit_ti_16, (), 5_717_416),
    (zoo.pythia, ("70m",), 70_426_624),  # Pythia paper, table: 70,426,624 total params
    (zoo.pythia, ("160m",), 162_322_944),
    (zoo.pythia, ("410m",), 405_334_016),
    (zoo.pythia, ("1b",), 1_011_781_632),
    (zoo.pythia, ("1.4b",), 1_414_647_808),
    (zoo.resnet18, (), 11_689_512),
    (zoo.resnet56, (), 853_018),
    (zoo.mobilenetv2, (), 3_504_872),
])
def test_published_parameter_counts(fn, args, expected):
    assert _count_on_meta(fn, *args) == expected


def test_pythia_config_values():
    with torch.device("meta"):
        m = zoo.pythia("410m")
    c = m.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (1024, 24, 16, 4096)
    assert c.vocab_size == 50304 and c.max_position_embeddings == 2048 and c.use_parallel_residual
    assert m.gpt_neox.layers[0].attention.rotary_ndims == 16  # 0.25 * 64
    assert c._attn_implementation == "eager" and not c.tie_word_embeddings


# ------------------------------------------------------------------------------------------ load_local
def test_load_local_hf_folder(tmp_path):
    for build in (zoo.tiny_pythia, zoo.tiny_bert, zoo.tiny_hf_deit):
        m = build()
        d = tmp_path / build.__name__
        m.save_pretrained(d)
        loaded = zoo.load_local(d)
        assert type(loaded) is type(m) and loaded.config._attn_implementation == "eager"
        a, b = registry.adapt(m), registry.adapt(loaded)
        x = a.example_inputs(2, 5)
        with torch.no_grad():
            torch.testing.assert_close(b.forward(x), a.forward(x))
        assert fingerprint(loaded) == fingerprint(m)


def test_load_local_state_dicts(tmp_path):
    m = zoo.tiny_deit(depth=3, dim=64, heads=1)  # dim 64 -> 1 head of 64 (inferred)
    p = tmp_path / "deit.pth"
    torch.save({"model": m.state_dict()}, p)
    loaded = zoo.load_local(p)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
    assert registry.adapt(loaded).prefix_tokens == 2 and not loaded.blocks[0].attn.fused_attn
    r = zoo.resnet56()
    torch.save(r.state_dict(), tmp_path / "r56.pt")
    r2 = zoo.load_local(tmp_path / "r56.pt", family="resnet56")
    assert fingerprint(r2) == fingerprint(r)
    v = zoo.tiny_vit()
    torch.save(v.state_dict(), tmp_path / "v.pt")
    assert fingerprint(zoo.load_local(tmp_path / "v.pt", family="tiny_vit")) == fingerprint(v)


def test_load_local_errors(tmp_path):
    with pytest.raises(HeartError, match="does not exist"):
        zoo.load_local(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(HeartError, match="cannot read"):
        zoo.load_local(tmp_path / "junk.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HeartError, match="config.json"):
        zoo.load_local(tmp_path / "empty")
    torch.save(zoo.resnet56().state_dict(), tmp_path / "r.pt")
    with pytest.raises(HeartError, match="do not fit"):
        zoo.load_local(tmp_path / "r.pt", family="tiny_resnet")
    with pytest.raises(HeartError, match="not a timm ViT"):
        zoo.load_local(tmp_path / "r.pt")
    torch.save(zoo.tiny_resnet(), tmp_path / "pickled.pt")  # a whole pickled module is refused
    with pytest.raises(HeartError, match="cannot read"):
        zoo.load_local(tmp_path / "pickled.pt")


# ----------------------------------------------------------------------------------------- fingerprint
def test_weight_sha_layout_and_dtype():
    w = torch.randn(5, 7)
    ref = hashlib.sha256(np.ascontiguousarray(w.numpy(), dtype=np.float32).tobytes()).hexdigest()
    assert weight_sha(w) == ref
    assert weight_sha(w.t().contiguous().t()) == ref  # strides do not matter
    assert weight_sha(nn.Parameter(w.clone())) == ref
    assert weight_sha(w.double()) == ref  # hashed as float32
    assert weight_sha(w.t()) != ref  # layout does


def test_fingerprint_changes_with_one_weight():
    m = zoo.tiny_resnet()
    f0 = fingerprint(m)
    assert fingerprint(m) == f0 and len(f0) == 64
    m2 = zoo.tiny_resnet()
    m2.load_state_dict(m.state_dict())
    assert fingerprint(m2) == f0
    with torch.no_grad():
        m.layer2[0].conv1.weight[0, 0, 0, 0] += 1e-3
    assert fingerprint(m) != f0
    with torch.no_grad():
        m.layer2[0].conv1.weight[0, 0, 0, 0] -= 1e-3
    m.layer1[0].bn1.running_mean[0] += 1.0  # buffers count too
    assert fingerprint(m) != f0


def test_full_size_cnn_builders_have_calibrated_batchnorm():
    """Random-init ResNet-56 with running stats 0/1 has logits ~1e4; the zoo calibrates them (O(1) activations)."""
    m = zoo.resnet56()
    bn = m.layer3[8].bn2
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    with torch.no_grad():
        y = m(torch.randn(4, 3, 32, 32))
    assert y.shape == (4, 10) and 0.1 < float(y.std()) < 100
    raw = zoo.CifarResNet(9).eval()
    with torch.no_grad():
        assert float(raw(torch.randn(4, 3, 32, 32)).abs().max()) > 100 * float(y.abs().max())
