"""Head removal: the pruned ONNX graph equals the masked PyTorch model (batch 1 and 8, fresh inputs)."""
import onnx
import pytest

from heart_onnx.surgery.api import prune
from heart_onnx.surgery.trt_rules import check_trt_rules
from heart_onnx.verify import verify

from _surgery_util import exported, plan_for

_CACHE: dict = {}

CASES = [("timm_vit", "dynamo"), ("timm_vit", "torchscript"), ("hf_deit", "dynamo"), ("bert", "torchscript"),
         ("pythia", "dynamo"), ("pythia", "torchscript")]


@pytest.mark.parametrize("name,exporter", CASES)
def test_heads_match_masked_reference(tmp_path_factory, tmp_path, name, exporter):
    m, a, path = exported(tmp_path_factory, _CACHE, name, exporter)
    H = a.num_heads
    plan = plan_for(m, a, heads={0: (1,), 1: tuple(range(H)), 2: (0, 3)})  # one, all, two heads
    out = prune(path, plan, tmp_path / "p.onnx")
    pruned = onnx.load(out)
    assert check_trt_rules(pruned) == []
    # the sliced weights really shrank: fewer parameters than the dense export
    n_dense = sum(int(onnx.numpy_helper.to_array(i).size) for i in onnx.load(path).graph.initializer)
    n_pruned = sum(int(onnx.numpy_helper.to_array(i).size) for i in pruned.graph.initializer)
    assert n_pruned < n_dense
    res = verify(out, a, plan, n=1, batch_sizes=(1, 8))
    assert res, str(res)


def test_all_heads_removed_keeps_bias(tmp_path_factory, tmp_path):
    m, a, path = exported(tmp_path_factory, _CACHE, "timm_vit", "dynamo")
    plan = plan_for(m, a, heads={l: tuple(range(a.num_heads)) for l in range(3)})
    out = prune(path, plan, tmp_path / "p.onnx")
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "Softmax" not in ops  # every attention branch is gone
    res = verify(out, a, plan, n=1, batch_sizes=(1, 8))
    assert res, str(res)
