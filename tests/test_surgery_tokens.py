"""Token selection: the pruned ONNX graph equals the masked PyTorch model (THE TOKEN RULE)."""
import onnx
import pytest

from heart_onnx.surgery.api import prune
from heart_onnx.surgery.metadata import get_plan_dict
from heart_onnx.surgery.trt_rules import check_trt_rules
from heart_onnx.verify import verify

from _surgery_util import exported, plan_for

_CACHE: dict = {}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("scorer,fuse", [("cls_attention", False), ("cls_attention", True), ("linear", False),
                                         ("linear", True)])
def test_timm_tokens_two_stages_with_heads(tmp_path_factory, tmp_path, exporter, scorer, fuse):
    m, a, path = exported(tmp_path_factory, _CACHE, "timm_vit", exporter)
    N = a.seq_len
    plan = plan_for(m, a, heads={0: (1,), 1: (0, 2)}, stages=((0, N - 4), (1, N - 9)), scorer=scorer, fuse=fuse)
    out = prune(path, plan, tmp_path / "p.onnx")
    model = onnx.load(out)
    assert check_trt_rules(model) == []
    assert [n.op_type for n in model.graph.node].count("TopK") == 2
    assert get_plan_dict(model)["tokens"] == [{"after_layer": 0, "keep": N - 4}, {"after_layer": 1, "keep": N - 9}]
    res = verify(out, a, plan, n=1, batch_sizes=(1, 8))
    assert res, str(res)


@pytest.mark.parametrize("name", ["timm_deit", "hf_vit"])
def test_tokens_other_vits(tmp_path_factory, tmp_path, name):
    m, a, path = exported(tmp_path_factory, _CACHE, name, "dynamo")
    N = a.seq_len
    plan = plan_for(m, a, heads={1: (3,)}, stages=((1, N - 6),), fuse=True)
    out = prune(path, plan, tmp_path / "p.onnx")
    res = verify(out, a, plan, n=1, batch_sizes=(1, 8))
    assert res, str(res)


def test_int32_indices(tmp_path_factory, tmp_path):
    m, a, path = exported(tmp_path_factory, _CACHE, "timm_vit", "dynamo")
    plan = plan_for(m, a, stages=((0, a.seq_len - 5),), fuse=True)
    out = prune(path, plan, tmp_path / "p.onnx", int32_indices=True)
    model = onnx.load(out)
    assert check_trt_rules(model, int32_indices=True) == []
    out64 = prune(path, plan, tmp_path / "p64.onnx")
    assert check_trt_rules(onnx.load(out64), int32_indices=True)  # INT64 indices are reported
    assert verify(out, a, plan, n=1, batch_sizes=(2,))


def test_trt_rules_flag_violations():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], sorted=0), helper.make_node("NonZero", ["x"], ["nz"])]
    g = helper.make_graph(nodes, "g", [x, k], [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
                                                helper.make_tensor_value_info("nz", TensorProto.INT64, None)])
    bad = check_trt_rules(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert any("K is computed" in b for b in bad) and any("sorted=0" in b for b in bad) and any("NonZero" in b for b in bad)


@pytest.mark.parametrize("exporter,scorer", [("dynamo", "linear"), ("torchscript", "cls_attention")])
def test_bert_tokens_with_padding(tmp_path_factory, tmp_path, exporter, scorer):
    """BERT: heads + two token stages + fused token; the padding mask is gathered with the tokens."""
    m, a, path = exported(tmp_path_factory, _CACHE, "bert", exporter)
    plan = plan_for(m, a, heads={0: (1,), 1: (0, 2)}, stages=((0, 12), (1, 7)), scorer=scorer, fuse=True)
    out = prune(path, plan, tmp_path / "p.onnx")
    batches = []
    for b in (1, 8):
        x = a.example_inputs(b)  # 16 tokens
        x["attention_mask"][0, -3:] = 0
        batches.append(x)
    res = verify(out, a, plan, inputs=batches)
    assert res, str(res)
