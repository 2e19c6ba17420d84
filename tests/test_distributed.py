"""Distributed accumulation (2 gloo processes on loopback) equals the single-process result."""
import os
import socket
import sys

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
    """One torchrun-like rank: the environment torchrun sets, ``init_from_env``, analyze, ``finish``, ``os._exit``
    (the exit ``heart-onnx`` takes under torchrun: finalization can abort while Gloo threads release tensors)."""
    from heart_onnx.sensitivity import distributed as D
    from heart_onnx.sensitivity.api import analyze

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    assert D.init_from_env("gloo") and D.owns_group()
    a, batches = _model_and_batches()
    sens = analyze(a, batches, probes=3, seed=4, holdout=0.4)
    if rank == 0:
        sens.save(os.path.join(out_dir, "dist.npz"))
    assert D.finish() and not D.owns_group() and D.rank_world() == (0, 1)
    sys.stdout.flush()
    os._exit(0)


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


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_cli_analyze_under_torchrun_equals_single_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m heart_onnx analyze`` exits 0 and writes what one process writes."""
    import subprocess

    from heart_onnx.cli.main import main
    from heart_onnx.sensitivities import Sensitivities

    args = ["analyze", "--model", "demo-vit", "--data", "digits:val", "--samples", "64", "--batch-size", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(_free_port()), "-m", "heart_onnx", *args, "-o", str(tmp_path / "dist.npz")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("wrote") == 1  # rank 0 reports, rank 1 stays quiet
    assert main([*args, "-o", str(tmp_path / "one.npz")]) == 0
    dist_s, one = Sensitivities.load(tmp_path / "dist.npz"), Sensitivities.load(tmp_path / "one.npz")
    assert dist_s.meta["world_size"] == 2 and one.meta["world_size"] == 1
    np.testing.assert_allclose(dist_s.head, one.head, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(dist_s.token_per_input, one.token_per_input, rtol=1e-5, atol=1e-12)
