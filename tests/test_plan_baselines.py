"""flops_target.plan_for_flops against an independent FLOPs count, and baselines.plannable's keep curves."""
import numpy as np
import pytest

from heart_onnx.budget import pareto
from heart_onnx.errors import HeartError
from heart_onnx.flops import model_flops
from heart_onnx.flops_target import index_for_flops, plan_at, plan_for_flops
from heart_onnx.sensitivities import Sensitivities
from heart_onnx.sensitivity.baselines import plannable

GEO = dict(family="vit", layers=3, heads=4, head_dim=8, hidden=32, seq_len=9, prefix_tokens=1, patch_size=2, in_chans=1,
           num_classes=10, mlp_hidden=64)


def _sens(seed, units="nats", scale=1.0):
    rng = np.random.default_rng(seed)
    L, H, N, P = 3, 4, 9, 1
    tok = rng.gamma(0.5, 0.01, (16, L, N)) * scale  # (S, L, N) per-input token scores
    tok[:, :, :P] = np.nan
    s = Sensitivities(meta={"family": "vit", "fingerprint": "t", "geometry": dict(GEO), "units": units,
                            "method": "synthetic"},
                      head=rng.gamma(0.5, 0.01, (L, H)) * scale, token_per_input=tok)
    return s, rng.random((16, L, N))  # run-time scorer values (higher = kept)


@pytest.mark.parametrize("targets", [["heads"], ["tokens"], ["heads", "tokens"]])
@pytest.mark.parametrize("seed", [0, 1])
def test_plan_for_flops_meets_target_and_is_maximal(targets, seed):
    s, run_time = _sens(seed)
    sp = plannable(s, run_time)
    curve = pareto(sp, targets)
    dense = model_flops(GEO).pruned
    reachable = float(1 - min(model_flops(GEO, plan_at(curve, i)).pruned for i in range(len(curve))) / dense)
    for r in (0.1, 0.2, 0.3, 0.4):
        if r > reachable:
            with pytest.raises(HeartError, match="no plan on this curve"):
                plan_for_flops(sp, r, targets)
            continue
        p = plan_for_flops(sp, r, targets)
        limit = (1 - r) * dense
        got = model_flops(GEO, p).pruned  # independent count from the plan itself
        assert got <= limit * (1 + 1e-12)
        assert p.notes["flops_target"] == r and abs(p.notes["reduction"] - (1 - got / dense)) < 1e-12
        # maximal: every curve point with more FLOPs than the chosen one misses the target
        idx = p.notes["pareto_index"]
        for i in range(len(curve)):
            f = model_flops(GEO, plan_at(curve, i)).pruned
            if f > got + 1e-9:
                assert f > limit, (i, f, limit)
        assert idx == index_for_flops(curve, r)


def test_plan_for_flops_units_do_not_matter_and_bad_input():
    # a ranking method's scores in any units: the same plan after scaling every score by 1000
    s1, rt = _sens(3, units="score")
    s2, _ = _sens(3, units="score", scale=1000.0)
    p1 = plan_for_flops(plannable(s1, rt), 0.3, ["heads", "tokens"])
    p2 = plan_for_flops(plannable(s2, rt), 0.3, ["heads", "tokens"])
    assert p1.heads == p2.heads and p1.tokens == p2.tokens
    for bad in (-0.1, 1.0, "x", float("nan")):
        with pytest.raises(HeartError, match="fraction"):
            plan_for_flops(plannable(s1, rt), bad, ["heads"])


def test_plannable_keep_curve_brute_force_and_normalisation():
    s, rt = _sens(5, units="score")
    sp = plannable(s, rt)
    assert abs(sp.head.sum() - 1) < 1e-12  # heads: shares of the total
    t = np.nan_to_num(sp.token_per_input)
    assert abs(t.sum() / t.shape[0] - 1) < 1e-12  # tokens: mean over inputs of all tokens sums to 1
    S, L, N = t.shape
    P = 1
    ref = np.full((L, N + 1), np.nan)
    for l in range(L):
        for K in range(P, N + 1):
            tot = 0.0
            for b in range(S):
                order = P + np.argsort(rt[b, l, P:], kind="stable")  # ascending scorer value: dropped first
                tot += t[b, l, order[: N - K]].sum()
            ref[l, K] = tot / S
    assert np.allclose(sp.token_keep_curve[:, P:], ref[:, P:], atol=1e-12)
    assert np.isnan(sp.token_keep_curve[:, :P]).all()
    # in nats (hessian, taylor, fisher): no normalisation
    sn, rt = _sens(5, units="nats")
    assert np.allclose(plannable(sn, rt).head, sn.head)


@pytest.mark.parametrize("fuse", [False, True])
def test_token_curve_does_not_dead_end(fuse):
    # a keep curve that makes the LAST stage nearly free: the greedy fills it first; drops must still move to
    # earlier stages until the first stage keeps min_keep (the most FLOPs tokens alone can save)
    s, rt = _sens(7)
    sp = plannable(s, rt)
    curve = sp.token_keep_curve.copy()
    curve[1] *= 1e-3  # stage after block 1 (the last pruning layer of 3 blocks) almost free
    sp.token_keep_curve = curve
    sp.token_keep_curves = {"cls_attention": curve}
    c = pareto(sp, ["tokens"], fuse_dropped=fuse)
    assert c.actions[0].layer == 1  # the cheap last stage is taken first
    from heart_onnx.plan import Plan, TokenStage

    best = Plan(fingerprint="t", family="vit", geometry=GEO, tokens=(TokenStage(0, 2),), fuse_dropped=fuse)
    dense = model_flops(GEO).pruned
    assert abs(c.flops.min() - model_flops(GEO, best).pruned) <= 1e-9 * dense  # independent count of the best plan
    for i in range(len(c)):  # every point's FLOPs is what its plan computes
        assert abs(model_flops(GEO, plan_at(c, i)).pruned - c.flops[i]) <= 1e-9 * dense
