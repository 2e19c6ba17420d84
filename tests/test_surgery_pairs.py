"""The invariant for weight-pair merges: ONNX surgery == PyTorch model with the merges applied (masked reference).

For each granularity (unstructured, 2:4, channel), on the demo-style CNN (BatchNorm folded into the
Conv by both exporters), a tiny timm ViT (fc1 -> fc2 channel pairs) and a tiny GPT-NeoX (linears),
exported with both torch exporters: ONNX Runtime on the surgically merged graph equals
``merge_weights.merged(model, merges)`` within 1e-4 of the output scale, at batch 1 and 8, on fresh
random inputs. 2:4 pattern and the shrinking of channel-merged layers are checked on the ONNX file.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
gs = pytest.importorskip("onnx_graphsurgeon")

from heart_onnx import pairing  # noqa: E402
from heart_onnx.errors import PlanMismatch, UnsupportedGraph  # noqa: E402
from heart_onnx.models.export import export  # noqa: E402
from heart_onnx.models.fingerprint import weight_sha  # noqa: E402
from heart_onnx.models.merge_weights import merged, merges_applied  # noqa: E402
from heart_onnx.surgery.pairs import apply_merges, sha_of  # noqa: E402

EXPORTERS = ("dynamo", "torchscript")


# ---------------------------------------------------------------------------------------------- helpers
def synthetic_entry(model: torch.nn.Module, name: str, consumer: str | None = None, seed: int = 0) -> dict:
    """A pairs entry with random positive curvature and a random SPD Gram (surgery does not care where merges come from)."""
    rng = np.random.default_rng(seed)
    w = model.get_parameter(name).detach().numpy().copy()
    r = int(np.prod(w.shape[1:]))
    x = rng.standard_normal((4 * r + 8, r)) @ (np.eye(r) + 0.3 * rng.standard_normal((r, r)))
    e = {"name": np.array(name), "sha": np.array(weight_sha(model.get_parameter(name))), "shape": np.array(w.shape),
         "weight": w, "hdiag": rng.uniform(0.1, 1.0, w.shape), "curvature": np.array(2.0), "gram": x.T @ x / len(x)}
    if consumer is not None:
        c = model.get_parameter(consumer).detach().numpy().copy()
        a = np.abs(rng.standard_normal((64, c.shape[1])))
        e.update({"consumer": np.array(consumer), "consumer_sha": np.array(weight_sha(model.get_parameter(consumer))),
                  "consumer_shape": np.array(c.shape), "consumer_weight": c, "consumer_hdiag": rng.uniform(0.1, 1.0, c.shape),
                  "consumer_curvature": np.array(2.0), "consumer_gram": a.T @ a / len(a)})
    return e


def surgery(path, merges, weights=None):
    g = gs.import_onnx(onnx.load(str(path)))
    g = apply_merges(g, merges, weights)
    m = gs.export_onnx(g)
    onnx.checker.check_model(m)
    return m


def run_ort(model_proto, feeds):
    sess = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: feeds[n] for n in names})[0]


def n_params(model_proto) -> int:
    return sum(int(np.prod(t.dims)) for t in model_proto.graph.initializer)


def init_by_sha_shape(model_proto, merged_torch_weight: np.ndarray) -> np.ndarray:
    """The initializer equal to ``merged_torch_weight`` (as is or transposed), in PyTorch layout."""
    from onnx import numpy_helper

    target = sha_of(merged_torch_weight)
    for t in model_proto.graph.initializer:
        v = numpy_helper.to_array(t)
        if v.shape == merged_torch_weight.shape and sha_of(v) == target:
            return v
        if v.ndim == 2 and v.T.shape == merged_torch_weight.shape and sha_of(v.T) == target:
            return v.T
    raise AssertionError("merged weight not found in the ONNX graph")


def check_equal(ref_model, onnx_model, make_inputs, input_name="pixel_values"):
    for b in (1, 8):
        x = make_inputs(b)
        with torch.no_grad():
            want = ref_model(x).numpy() if not isinstance(x, dict) else ref_model(**x).logits.numpy()
        feeds = {input_name: x.numpy()} if not isinstance(x, dict) else {k: v.numpy() for k, v in x.items()}
        got = run_ort(onnx_model, feeds)
        scale = max(1.0, float(np.abs(want).max()))
        err = float(np.abs(got - want).max())
        assert err <= 1e-4 * scale, f"batch {b}: max abs diff {err} > 1e-4 * {scale}"


def _export(model, example, path, exporter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export(model, example, path, exporter=exporter)


# ---------------------------------------------------------------------------------------------- models
def demo_style_cnn():
    from heart_onnx.models.demo import build_cnn

    m = build_cnn().eval()
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():  # non-trivial BatchNorm statistics, so folding really rescales rows
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.2)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.randn(mod.num_features, generator=g) * 0.5 + 1)
            mod.bias.data.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
    return m


def tiny_vit():
    from heart_onnx.models.zoo import tiny_vit as tv

    m = tv().eval()
    with torch.no_grad():  # timm zero-inits biases and the exporter dedups equal constants: make them distinct
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    return m


_CACHE: dict = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``get(family, exporter) -> (model, path)``: each model exported once per module."""
    def get(family, exporter):
        key = (family, exporter)
        if key not in _CACHE:
            torch.manual_seed(123)
            model, example = {"vit": (tiny_vit, lambda: torch.randn(1, 3, 32, 32)),
                              "cnn": (demo_style_cnn, lambda: torch.randn(1, 1, 8, 8))}[family]
            m = model()
            path = _export(m, example(), tmp_path_factory.mktemp(f"{family}-{exporter}") / f"{family}.onnx", exporter)
            _CACHE[key] = (m, path)
        return _CACHE[key]
    return get


CNN_WEIGHTS = ("layer1.0.conv1.weight", "layer2.0.conv2.weight", "fc.weight")
CNN_CHANNEL = (("layer1.0.conv1.weight", "layer1.0.conv2.weight"), ("layer3.0.conv1.weight", "layer3.0.conv2.weight"))
VIT_WEIGHTS = ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.weight", "blocks.1.attn.proj.weight", "head.weight")
VIT_CHANNEL = (("blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"), ("blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.weight"))


def make_merges(model, granularity, method="camp"):
    cnn = any(n.startswith("layer1") for n, _ in model.named_parameters())
    if granularity == "channel":
        pairs = CNN_CHANNEL if cnn else VIT_CHANNEL
        return tuple(pairing.make_merge(synthetic_entry(model, p, c, i), "channel", 0.5, method) for i, (p, c) in enumerate(pairs))
    names = CNN_WEIGHTS if cnn else VIT_WEIGHTS
    ents = [synthetic_entry(model, n, seed=i) for i, n in enumerate(names)]
    return tuple(pairing.make_merge(e, granularity, 0.5 if granularity == "2:4" else 0.6, method)
                 for e in ents if pairing.supports(e, granularity))


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("granularity", ["unstructured", "2:4", "channel"])
def test_vit_surgery_matches_masked_reference(exported, exporter, granularity):
    model, path = exported("vit", exporter)
    merges = make_merges(model, granularity)
    assert merges and all(len(m.pruned) for m in merges)
    ref = merged(model, merges)
    out = surgery(path, merges)
    check_equal(ref, out, lambda b: torch.randn(b, 3, 32, 32))
    dense = onnx.load(str(path))
    if granularity == "channel":
        expect = sum(len(m.pruned) * (m.shape[1] + 1 + m.consumer_shape[0]) for m in merges)  # rows + bias + columns
        assert n_params(dense) - n_params(out) == expect
    else:
        assert n_params(dense) == n_params(out)
    if granularity == "2:4":
        for m in merges:
            w = init_by_sha_shape(out, ref.get_parameter(m.weight).detach().numpy())
            nz = (w.reshape(w.shape[0], w.shape[1] // 4, 4) != 0).sum(-1)
            assert np.all(nz == 2), f"{m.weight}: not 2:4"


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("granularity", ["unstructured", "2:4", "channel"])
def test_cnn_surgery_matches_masked_reference_with_folded_batchnorm(exported, exporter, granularity):
    model, path = exported("cnn", exporter)
    merges = make_merges(model, granularity)
    assert merges
    ref = merged(model, merges)
    weights = {n: p.detach().numpy() for n, p in model.named_parameters()}
    out = surgery(path, merges, weights)
    check_equal(ref, out, lambda b: torch.randn(b, 1, 8, 8))
    dense = onnx.load(str(path))
    if granularity == "channel":
        # producer rows + folded bias + (consumer columns); BatchNorm is folded, so no BN parameters remain
        expect = sum(len(m.pruned) * (int(np.prod(m.shape[1:])) + 1 + m.consumer_shape[0] * int(np.prod(m.consumer_shape[2:])))
                     for m in merges)
        assert n_params(dense) - n_params(out) == expect
    if granularity == "2:4":
        from onnx import numpy_helper

        convs = {n.input[1] for n in out.graph.node if n.op_type == "Conv"}
        shapes = {tuple(m.shape) for m in merges}
        checked = 0
        for t in out.graph.initializer:
            v = numpy_helper.to_array(t)
            if t.name in convs and tuple(v.shape) in shapes and v.ndim == 4:
                groups = v.transpose(0, 2, 3, 1).reshape(-1, 4)
                if np.all((groups != 0).sum(1) == 2):
                    checked += 1
        assert checked >= sum(1 for m in merges if len(m.shape) == 4)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_cnn_folded_conv_found_by_row_signature_anchors(exported, exporter):
    """Without the original weights: ``Plan.anchors`` row signatures find the folded Convs."""
    model, path = exported("cnn", exporter)
    merges = make_merges(model, "unstructured") + make_merges(model, "channel")
    ents = {n: {"name": np.array(n), "weight": p.detach().numpy()} for n, p in model.named_parameters()}
    anchors = pairing.anchors_for(merges, ents)
    assert all(f"{m.weight}:rowsign" in anchors for m in merges)
    ref = merged(model, merges)
    out = surgery_anchors(path, merges, anchors)
    check_equal(ref, out, lambda b: torch.randn(b, 1, 8, 8))


def surgery_anchors(path, merges, anchors):
    g = apply_merges(gs.import_onnx(onnx.load(str(path))), merges, anchors=anchors)
    m = gs.export_onnx(g)
    onnx.checker.check_model(m)
    return m


def test_row_signature_is_invariant_to_row_scaling():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    s = rng.uniform(-3, 3, (8, 1, 1, 1)).astype(np.float32)
    assert pairing.row_signature(w) == pairing.row_signature(w * s)
    w2 = w.copy()
    w2[0, 0, 0, 0] *= -1 if abs(w2[0, 0, 0, 0]) < np.abs(w2[0]).max() else 1
    w2[1] = w2[1] * np.where(np.arange(36).reshape(4, 3, 3) == 5, -1, 1)
    assert pairing.row_signature(w2) != pairing.row_signature(w)


def test_cnn_folded_conv_needs_weights(exported):
    model, path = exported("cnn", "dynamo")
    merges = make_merges(model, "unstructured")
    with pytest.raises(UnsupportedGraph, match="folded BatchNorm"):
        surgery(path, merges)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("granularity", ["unstructured", "2:4"])
def test_gpt_neox_surgery_matches_masked_reference(tmp_path, exporter, granularity):
    pytest.importorskip("transformers")
    try:
        from heart_onnx.models.zoo import tiny_pythia
    except ImportError:
        pytest.skip("heart_onnx.models.zoo.tiny_pythia is not available yet")
    key = ("neox", exporter)
    if key not in _CACHE:
        torch.manual_seed(123)
        m = tiny_pythia().eval()
        _CACHE[key] = (m, None)
    model = _CACHE[key][0]
    names = [n for n, p in model.named_parameters() if p.dim() == 2 and ("dense" in n or "query_key_value" in n)][:4]
    merges = tuple(pairing.make_merge(synthetic_entry(model, n, seed=i), granularity, 0.5) for i, n in enumerate(names))
    vocab = model.config.vocab_size

    def inputs(b, t=8):
        return {"input_ids": torch.randint(0, vocab, (b, t)), "attention_mask": torch.ones(b, t, dtype=torch.long)}

    if _CACHE[key][1] is None:
        _CACHE[key] = (model, _export(model, inputs(2), tmp_path / "neox.onnx", exporter))
    path = _CACHE[key][1]
    ref = merged(model, merges)
    out = surgery(path, merges)
    check_equal(ref, out, inputs)


def test_merge_weights_checks_sha_and_restores():
    model = tiny_vit()
    merges = make_merges(model, "unstructured")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with merges_applied(model, merges) as m:
        w = m.get_parameter(merges[0].weight).detach().numpy()
        np.testing.assert_array_equal(w, pairing.apply_rule(before[merges[0].weight].numpy(), merges[0]))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    other = tiny_vit()  # different random init
    with pytest.raises(PlanMismatch):
        merged(other, merges)


def test_mobilenetv2_chain_pairs_real_sensitivities(tmp_path):
    """End to end on a tiny MobileNetV2 (project conv -> BN -> next expand conv pairs, depthwise convs):
    sensitivities -> merges -> surgery found by plan anchors (BN folded) == masked reference."""
    from heart_onnx.models.registry import adapt
    from heart_onnx.models.zoo import tiny_mobilenetv2
    from heart_onnx.sensitivity.pairs import weight_sensitivities

    torch.manual_seed(0)
    model = tiny_mobilenetv2().eval()
    ad = adapt(model)
    assert ad.channel_pairs()
    ents = weight_sensitivities(ad, [torch.randn(4, 3, 32, 32)], probes=2, power_iters=2)
    merges = tuple(pairing.make_merge(e, "channel", 0.5) for e in ents.values() if pairing.supports(e, "channel"))
    merges += tuple(pairing.make_merge(e, "2:4", 0.5) for n, e in ents.items()
                    if pairing.supports(e, "2:4") and n not in {m.weight for m in merges} | {m.consumer for m in merges})
    path = _export(model, torch.randn(1, 3, 32, 32), tmp_path / "mnv2.onnx", "dynamo")
    out = surgery_anchors(path, merges, pairing.anchors_for(merges, ents))
    check_equal(merged(model, merges), out, lambda b: torch.randn(b, 3, 32, 32))
    assert n_params(onnx.load(str(path))) > n_params(out)
