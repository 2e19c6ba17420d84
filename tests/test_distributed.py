"""Distributed accumulation (2 gloo processes on loopback) equals the single-process result."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp


def _model_and_batches():
    from heart_onnx.models import demo
    from heart_onnx.models.registry import adapt

    torch.manual_seed(0)
    m = demo.build_vit(depth=2, embed_dim=32, num_heads=4).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.qkv.weight.mul_(3.0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, 1, 8, 8, generator=g) for _ in range(5)]  # odd count: ranks get 3 and 2
    return adapt(m), batches


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from heart_onnx.sensitivity.api import analyze

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        a, batches = _model_and_batches()
        sens = analyze(a, batches, probes=3, seed=4, holdout=0.4)
        if rank == 0:
            sens.save(os.path.join(out_dir, "dist.npz"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_process_gloo_equals_single_process(tmp_path):
    from heart_onnx.sensitivities import Sensitivities
    from heart_onnx.sensitivity import distributed as D
    from heart_onnx.sensitivity.api import analyze

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    dist_s = Sensitivities.load(tmp_path / "dist.npz")
    assert D.rank_world() == (0, 1)  # no process group here
    a, batches = _model_and_batches()
    single = analyze(a, batches, probes=3, seed=4, holdout=0.4)
    assert dist_s.meta["world_size"] == 2 and single.meta["world_size"] == 1
    assert dist_s.head_per_input.shape == single.head_per_input.shape == (15, 2, 4)
    np.testing.assert_allclose(dist_s.head_per_input, single.head_per_input, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(dist_s.head, single.head, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(dist_s.token_per_input, single.token_per_input, rtol=1e-6, atol=1e-12)
    for k in single.token_keep_curves:
        np.testing.assert_allclose(dist_s.token_keep_curves[k], single.token_keep_curves[k], rtol=1e-6, atol=1e-12)
    for l in single.scorers:
        np.testing.assert_allclose(dist_s.scorers[l][0], single.scorers[l][0], rtol=1e-4, atol=1e-6)
    assert dist_s.scorer_quality["linear"]["n_inputs"] == single.scorer_quality["linear"]["n_inputs"] == 6
    # scorer weights agree to float32 rounding (sums in another order): near-tied ranks may swap
    assert dist_s.scorer_quality["linear"]["spearman"] == pytest.approx(single.scorer_quality["linear"]["spearman"], abs=0.05)


def test_helpers_are_identity_single_process():
    from heart_onnx.sensitivity import distributed as D

    assert D.shard(5) == [0, 1, 2, 3, 4]
    a = np.arange(4.0)
    assert np.array_equal(D.all_reduce_sum(a), a)
    assert D.gather_indexed([(2, "c"), (0, "a"), (1, "b")]) == ["a", "b", "c"]
    assert D.init_from_env() is False
