"""The analytic FLOPs model vs hand counts and vs the MACs of exported ONNX graphs.

Graph references: every MatMul/Gemm/Conv of an exported graph, with shapes taken from an actual
ONNX Runtime run (intermediate tensors exposed as outputs), and engineer C's
``heart_onnx.graph_flops`` when it is installed. Pruned references are real smaller models (heads
sliced out of the torch model, token selection written out in torch), not the plan machinery.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from heart_onnx.errors import HeartError
from heart_onnx.flops import ConvLayer, model_flops, transformer_spec, weight_layer
from heart_onnx.plan import Plan, TokenStage, WeightMerge

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
nn = torch.nn


# ---------------------------------------------------------------------------------------------- references
def ort_macs(path, feeds) -> int:
    """MACs of every MatMul/Gemm/Conv, with shapes from an ONNX Runtime run (batch as fed)."""
    m = onnx.load(str(path))
    inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
    nodes = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    outs = {o.name for o in m.graph.output}
    want: list[str] = []
    for n in nodes:
        for t in (n.input[0], n.input[1], n.output[0]):
            if t not in inits and t not in want:
                want.append(t)
                if t not in outs:
                    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    vals = dict(zip(want, sess.run(want, feeds)))

    def shape(t):
        return inits[t] if t in inits else vals[t].shape

    total = 0
    for n in nodes:
        a, b, o = shape(n.input[0]), shape(n.input[1]), shape(n.output[0])
        if n.op_type == "Conv":
            total += int(np.prod(o)) * int(np.prod(b[1:]))
        elif n.op_type == "Gemm":
            ta = any(at.name == "transA" and at.i for at in n.attribute)
            total += int(np.prod(o)) * int(a[0] if ta else a[-1])
        else:
            total += int(np.prod(o)) * int(a[-1])
    return total


def graph_flops_macs(path) -> float | None:
    """MatMul/Gemm/Conv MACs from engineer C's graph_flops, or None while it is not there."""
    try:
        from heart_onnx.graph_flops import graph_flops
    except ImportError:
        return None
    return float(graph_flops(onnx.load(str(path))).macs)


def export(module, args, path, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names)
    return path


def check_graph(path, feeds, expected_macs, rel=0.0):
    got = ort_macs(path, feeds)
    assert got == pytest.approx(expected_macs, rel=rel, abs=0.5)
    gf = graph_flops_macs(path)
    if gf is not None:
        assert gf == pytest.approx(expected_macs, rel=max(rel, 0.02))


# ---------------------------------------------------------------------------------------------- tiny timm ViT
timm = pytest.importorskip("timm")

TINY = dict(family="vit", layers=2, heads=4, head_dim=8, hidden=32, seq_len=17, prefix_tokens=1, patch_size=8,
            in_chans=3, num_classes=10, mlp_hidden=128)


def tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10).eval()


def remove_heads_(model, layer: int, heads: list[int]) -> None:
    """Really remove heads from a timm block (slice qkv rows and proj columns)."""
    attn = model.blocks[layer].attn
    H, Dh = attn.num_heads, attn.head_dim
    keep = [h for h in range(H) if h not in heads]
    rows = torch.tensor([t * H * Dh + h * Dh + d for t in range(3) for h in keep for d in range(Dh)])
    cols = torch.tensor([h * Dh + d for h in keep for d in range(Dh)])
    qkv = nn.Linear(attn.qkv.in_features, len(rows))
    qkv.weight.data = attn.qkv.weight.data[rows].clone()
    qkv.bias.data = attn.qkv.bias.data[rows].clone()
    proj = nn.Linear(len(cols), attn.proj.out_features)
    proj.weight.data = attn.proj.weight.data[:, cols].clone()
    proj.bias.data = attn.proj.bias.data.clone()
    attn.qkv, attn.proj = qkv, proj
    attn.num_heads, attn.attn_dim = len(keep), len(keep) * Dh


class TokenViT(nn.Module):
    """A timm ViT with token stages written out: linear scorer, TopK, gather, optional fused token."""

    def __init__(self, vit, stages, fuse):
        super().__init__()
        self.vit, self.stages, self.fuse = vit, dict(stages), fuse
        D = vit.embed_dim
        self.w = nn.ParameterDict({str(l): nn.Parameter(torch.randn(D, 1)) for l in self.stages})

    def forward(self, x):
        v = self.vit
        x = v._pos_embed(v.patch_embed(x))  # (B, N, D)
        for l, blk in enumerate(v.blocks):
            x = blk(x)
            if l in self.stages:
                K = self.stages[l]
                pre, rest = x[:, :1], x[:, 1:]  # (B, 1, D), (B, N-1, D)
                s = (rest @ self.w[str(l)]).squeeze(-1)  # (B, N-1): linear scorer
                order = torch.argsort(s, dim=-1, descending=True)
                keep_i, drop_i = order[:, : K - 1], order[:, K - 1:]
                kept = torch.gather(rest, 1, keep_i[..., None].expand(-1, -1, rest.shape[-1]))
                parts = [pre, kept]
                if self.fuse:
                    wd = torch.softmax(torch.gather(s, 1, drop_i), -1)[:, None]  # (B, 1, N-K)
                    dropped = torch.gather(rest, 1, drop_i[..., None].expand(-1, -1, rest.shape[-1]))
                    parts.append(wd @ dropped)  # (B, 1, D): one MatMul over the dropped tokens
                x = torch.cat(parts, 1)
        return v.forward_head(v.norm(x))


def _img():
    return {"pixel_values": np.random.randn(1, 3, 32, 32).astype(np.float32)}


def test_tiny_vit_dense_matches_graph(tmp_path):
    path = export(tiny_vit(), (torch.randn(1, 3, 32, 32),), tmp_path / "v.onnx", ["pixel_values"])
    r = model_flops(TINY)
    assert r.pruned == r.dense
    check_graph(path, _img(), r.macs_dense)


def test_tiny_vit_heads_removed_matches_graph(tmp_path):
    m = tiny_vit()
    remove_heads_(m, 0, [1, 3])
    remove_heads_(m, 1, [2])
    path = export(m, (torch.randn(1, 3, 32, 32),), tmp_path / "h.onnx", ["pixel_values"])
    plan = Plan(fingerprint="x", family="vit", geometry=TINY, heads={0: (1, 3), 1: (2,)})
    r = model_flops(TINY, plan)
    assert r.heads_per_layer == (2, 3)
    assert r.pruned < r.dense
    check_graph(path, _img(), r.macs_pruned)


@pytest.mark.parametrize("fuse", [False, True])
def test_tiny_vit_tokens_match_graph(tmp_path, fuse):
    geo = dict(TINY, layers=3)
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=10).eval()
    stages = {0: 11, 1: 6}
    m = TokenViT(vit, stages, fuse).eval()
    path = export(m, (torch.randn(1, 3, 32, 32),), tmp_path / "t.onnx", ["pixel_values"])
    plan = Plan(fingerprint="x", family="vit", geometry=geo, tokens=tuple(TokenStage(l, k) for l, k in stages.items()),
                token_scorer="linear", fuse_dropped=fuse)
    r = model_flops(geo, plan)
    extra = 1 if fuse else 0
    assert r.tokens_per_layer == (17, 11 + extra, 6 + extra)
    assert r.overhead > 0
    check_graph(path, _img(), r.macs_pruned)


# ---------------------------------------------------------------------------------------------- hand counts
def test_vit_b16_hand_count():
    geo = dict(family="vit", layers=12, heads=12, head_dim=64, hidden=768, seq_len=197, prefix_tokens=1,
               patch_size=16, num_classes=1000)
    N, D, M = 197, 768, 3072
    block = N * D * 3 * D + 2 * 12 * N * N * 64 + N * D * D + 2 * N * D * M
    hand = 196 * D * 3 * 16 * 16 + 12 * block + D * 1000
    r = model_flops(geo)
    assert r.macs_dense == hand
    assert r.macs_dense / 1e9 == pytest.approx(17.56, abs=0.01)  # the published ~17.6 GMACs
    # heads removed and a token stage, counted by hand
    plan = Plan(fingerprint="x", family="vit", geometry=geo, heads={0: (0, 1, 2), 11: tuple(range(12))},
                tokens=(TokenStage(5, 100),))
    r = model_flops(geo, plan)

    def blk(n, h):
        a = h * 64
        return n * D * 3 * a + 2 * h * n * n * 64 + n * a * D + 2 * n * D * M

    hand = 196 * D * 768 + blk(197, 9) + sum(blk(197, 12) for _ in range(1, 6)) + sum(blk(100, 12) for _ in range(6, 11)) \
        + blk(100, 0) + D * 1000
    assert r.macs_pruned == hand
    assert r.tokens_per_layer == (197,) * 6 + (100,) * 6
    assert r.overhead == 0  # cls-attention scorer: no products


def test_bert_and_gpt_neox_hand_counts():
    bert = dict(family="bert", layers=2, heads=4, head_dim=8, hidden=32, mlp_hidden=64, seq_len=16, prefix_tokens=1)
    per_layer = 16 * 32 * 32 * 4 + 2 * 4 * 16 * 16 * 8 + 2 * 16 * 32 * 64
    assert model_flops(bert).macs_dense == 2 * per_layer + 32 * 32  # + pooler
    neox = dict(family="gpt_neox", layers=2, heads=4, head_dim=8, hidden=32, mlp_hidden=128, vocab_size=100)
    with pytest.raises(HeartError, match="seq_len"):
        model_flops(neox)
    T = 16
    per_layer = T * 32 * 96 + 2 * 4 * T * T * 8 + T * 32 * 32 + 2 * T * 32 * 128
    assert model_flops(neox, seq_len=T).macs_dense == 2 * per_layer + T * 32 * 100
    plan = Plan(fingerprint="x", family="gpt_neox", geometry=neox, heads={1: (0, 3)}, prefix_tokens=0)
    r = model_flops(neox, plan, seq_len=T)
    assert r.macs_dense - r.macs_pruned == 2 * (T * 4 * 32 * 8 + 2 * T * T * 8)


ZOO = ["tiny_vit", "tiny_deit", "tiny_hf_vit", "tiny_hf_deit", "tiny_bert", "tiny_pythia", "tiny_resnet", "tiny_mobilenetv2"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_geometry_matches_graph(tmp_path, name):
    """Every family through its adapter's geometry (what analyze records) vs the exported graph, exactly."""
    zoo = pytest.importorskip("heart_onnx.models.zoo")
    from heart_onnx.models.registry import adapt

    m = getattr(zoo, name)().eval()
    adapter = adapt(m)
    x = adapter.example_inputs(1)
    if isinstance(x, dict):
        names, args = list(x), tuple(x.values())
        seq_len = int(x["input_ids"].shape[1])

        class Wrap(nn.Module):
            def __init__(self):
                super().__init__()
                self.m = m

            def forward(self, *a):
                return adapter.forward(dict(zip(names, a)))

        mod = Wrap()
    else:
        names, args, seq_len, mod = ["x"], (x,), None, m
    path = export(mod, args, tmp_path / "m.onnx", names)
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    check_graph(path, feeds, model_flops(adapter.geometry(), seq_len=seq_len).macs_dense)


# ---------------------------------------------------------------------------------------------- CNN
class TinyCNN(nn.Module):
    def __init__(self, c1=8, c2=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(c2, c2, 3, padding=1, groups=c2)
        self.fc = nn.Linear(c2, 10)

    def forward(self, x):  # (B, 3, 16, 16)
        x = torch.relu(self.conv1(x))  # (B, c1, 16, 16)
        x = torch.relu(self.conv2(x))  # (B, c2, 8, 8)
        x = self.dw(x).mean((2, 3))  # (B, c2)
        return self.fc(x)


def _convs(c1=8, c2=16):
    return [
        dict(name="conv1.weight", in_ch=3, out_ch=c1, kernel=3, out_hw=16),
        dict(name="conv2", in_ch=c1, out_ch=c2, kernel=[3, 3], out_hw=[8, 8]),
        dict(name="dw", in_ch=c2, out_ch=c2, kernel=3, groups=c2, out_hw=8),
        dict(name="fc", in_ch=c2, out_ch=10),
    ]


def test_cnn_dense_and_channel_merge_match_graph(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    feeds = {"x": x.numpy()}
    geo = {"family": "cnn", "conv_layers": _convs()}
    dense = model_flops(geo)
    check_graph(export(TinyCNN(), (x,), tmp_path / "c.onnx", ["x"]), feeds, dense.macs_dense)
    # 3 of conv1's 8 channels merged into partners: conv1 loses 3 outputs, conv2 3 inputs
    merge = WeightMerge(weight="conv1.weight", weight_sha="a", shape=(8, 3, 3, 3), granularity="channel",
                        pruned=np.array([0, 2, 5]), partner=np.array([1, 1, 3]), coef=np.ones(3, np.float32),
                        consumer="conv2.weight", consumer_sha="b", consumer_shape=(16, 8, 3, 3))
    plan = Plan(fingerprint="x", family="cnn", geometry=geo, merges=(merge,), prefix_tokens=0)
    r = model_flops(geo, plan)
    assert r.pruned < r.dense
    check_graph(export(TinyCNN(c1=5), (x,), tmp_path / "c5.onnx", ["x"]), feeds, r.macs_pruned)
    # unstructured merges keep dense shapes: reported as sparse FLOPs only
    um = WeightMerge(weight="conv2.weight", weight_sha="a", shape=(16, 8, 3, 3), granularity="unstructured",
                     pruned=np.arange(100), partner=np.arange(100, 200), coef=np.zeros(100, np.float32))
    r = model_flops(geo, plan.replace(merges=(um,)))
    assert r.pruned == r.dense
    assert r.sparse_saved == 2 * 100 * 64
    assert r.effective == r.dense - r.sparse_saved


def test_transformer_merges_and_sparse_rows():
    plan = Plan(fingerprint="x", family="vit", geometry=TINY, tokens=(TokenStage(0, 9),), merges=(
        WeightMerge(weight="blocks.1.mlp.fc1.weight", weight_sha="a", shape=(128, 32), granularity="channel",
                    pruned=np.arange(10), partner=np.arange(10, 20), coef=np.zeros(10, np.float32),
                    consumer="blocks.1.mlp.fc2.weight", consumer_sha="b", consumer_shape=(32, 128)),
        WeightMerge(weight="blocks.0.attn.qkv.weight", weight_sha="a", shape=(96, 32), granularity="2:4",
                    pruned=np.arange(0, 3072, 2), partner=np.arange(1, 3072, 2), coef=np.zeros(1536, np.float32)),
    ))
    base = model_flops(TINY, plan.replace(merges=()))
    r = model_flops(TINY, plan)
    assert base.pruned - r.pruned == 2 * 9 * 10 * (32 + 32)  # 9 tokens in block 1, fc1 rows + fc2 columns
    assert r.sparse_saved == 2 * 17 * 1536  # block 0 runs on all 17 tokens
    assert weight_layer("gpt_neox.layers.3.mlp.dense_h_to_4h.weight") == 3
    assert weight_layer("bert.encoder.layer.11.output.dense.weight") == 11
    assert weight_layer("head.weight") is None


def test_invalid_plans_and_geometry_are_clear_errors():
    with pytest.raises(HeartError, match="keeps 30 tokens"):
        model_flops(TINY, Plan(fingerprint="x", family="vit", geometry=TINY, tokens=(TokenStage(0, 30),)))
    with pytest.raises(HeartError, match="keeps 1 tokens"):
        model_flops(TINY, Plan(fingerprint="x", family="vit", geometry=TINY, tokens=(TokenStage(0, 1),)))
    with pytest.raises(HeartError, match="heads are 0..3"):
        model_flops(TINY, Plan(fingerprint="x", family="vit", geometry=TINY, heads={0: (4,)}))
    with pytest.raises(HeartError, match="layers"):
        transformer_spec({"family": "vit", "heads": 2})
    with pytest.raises(HeartError, match="conv_layers"):
        model_flops({"family": "cnn"})
    with pytest.raises(HeartError, match="family"):
        model_flops({"family": "rnn", "layers": 1})
    assert ConvLayer("a", 4, 8, (3, 3), 1, (2, 2)).macs() == 8 * 4 * 9 * 4


def test_vit_b16_blocks_match_graph(tmp_path):
    """ViT-B/16 width and sequence (224x224, 197 tokens, 12 heads) with 2 blocks: every block is exact; the
    12-block total is the hand count above (full ViT-B/16 export: benchmarks/planner_speed.py --check-flops)."""
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=2, num_heads=12, weight_init="skip").eval()
    remove_heads_(m, 1, [0, 5, 7])
    path = tmp_path / "b16.onnx"
    export(m, (torch.randn(1, 3, 224, 224),), path, ["pixel_values"])
    geo = dict(family="vit", layers=2, heads=12, head_dim=64, hidden=768, seq_len=197, prefix_tokens=1,
               patch_size=16, num_classes=1000)
    plan = Plan(fingerprint="x", family="vit", geometry=geo, heads={1: (0, 5, 7)})
    check_graph(path, {"pixel_values": np.random.randn(1, 3, 224, 224).astype(np.float32)}, model_flops(geo, plan).macs_pruned)


def test_surgery_output_matches_model(tmp_path):
    """Engineer G's surgery on a dynamo export of the zoo tiny ViT (heads + a token stage, both scorers, fused
    token): the pruned graph's MACs equal the model's count exactly, overhead included."""
    try:
        from heart_onnx.models import zoo
        from heart_onnx.models.export import export as ho_export
        from heart_onnx.models.fingerprint import fingerprint
        from heart_onnx.models.registry import adapt
        from heart_onnx.surgery.api import prune
    except ImportError as exc:
        pytest.skip(f"surgery not available: {exc}")
    m = zoo.tiny_vit().eval()
    a = adapt(m)
    g = a.geometry()
    src = tmp_path / "tv.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ho_export(m, a.example_inputs(1), src, exporter="dynamo")
    x = np.random.randn(1, *a.example_inputs(1).shape[1:]).astype(np.float32)
    L = g["layers"]
    for fuse, scorer in ((False, "cls_attention"), (True, "linear")):
        plan = Plan(fingerprint=fingerprint(m), family="vit", geometry=g, heads={0: (1,), L - 1: (0, 2)},
                    tokens=(TokenStage(0, 9),), token_scorer=scorer, fuse_dropped=fuse,
                    scorers={0: (tuple(np.random.randn(g["hidden"]).tolist()), 0.0)} if scorer == "linear" else {})
        out = prune(src, plan, tmp_path / f"p{int(fuse)}.onnx")
        name = onnx.load(str(out)).graph.input[0].name
        r = model_flops(g, plan)
        assert r.tokens_per_layer[1] == 9 + int(fuse)
        check_graph(out, {name: x}, r.macs_pruned)
