"""The loss-budget planner: budgets respected, monotone Pareto, optimality where it is provable, JSON round
trip, calibration, CLI. Sensitivities are synthetic (random but structured like analyze's output) so
every expected number is computed independently here."""
from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest

from heart_onnx import pairing
from heart_onnx.budget import MAX_BUDGET, calibrate, check_budget, default_token_layers, pareto, plan, predict
from heart_onnx.cli.main import main
from heart_onnx.errors import HeartError
from heart_onnx.flops import model_flops
from heart_onnx.plan import Plan
from heart_onnx.sensitivities import Sensitivities


def vit_geo(L=4, H=4, Dh=8, N=17, P=1, patch=4):
    return dict(family="vit", layers=L, heads=H, head_dim=Dh, hidden=H * Dh, seq_len=N, prefix_tokens=P,
                patch_size=patch, in_chans=3, num_classes=10, mlp_hidden=4 * H * Dh)


def token_curve(rng, L, N, P):
    """(L, N+1) like analyze's: [l, K] = sum of the N-K smallest token scores (scorer drops the least useful)."""
    curve = np.full((L, N + 1), np.nan)
    for l in range(L):
        s = np.sort(rng.gamma(0.5, 0.02, N - P))
        cum = np.concatenate([[0.0], np.cumsum(s)])
        for k in range(P, N + 1):
            curve[l, k] = cum[N - k]
    return curve


def fc_entry(rng, name, out, inp, consumer=None):
    """A Sensitivities.pairs entry as sensitivity/pairs.py makes it (producer with an optional consumer)."""
    e = {"name": np.array(name), "sha": np.array("s" + name), "shape": np.array([out, inp]),
         "weight": rng.standard_normal((out, inp)).astype(np.float32),
         "hdiag": rng.gamma(1.0, 1e-3, (out, inp)).astype(np.float32), "curvature": np.array(1.0)}
    if consumer:
        e.update({"consumer": np.array(consumer), "consumer_sha": np.array("s" + consumer),
                  "consumer_shape": np.array([inp, out]),
                  "consumer_weight": rng.standard_normal((inp, out)).astype(np.float32),
                  "consumer_hdiag": rng.gamma(1.0, 1e-3, (inp, out)).astype(np.float32),
                  "consumer_curvature": np.array(1.0)})
    return e


def synth(L=4, H=4, Dh=8, N=17, P=1, seed=0, pairs=False, scorers=False, geo=None):
    rng = np.random.default_rng(seed)
    geo = geo or vit_geo(L, H, Dh, N, P)
    s = Sensitivities(meta={"family": geo["family"], "fingerprint": "fp" + str(seed), "geometry": geo},
                      head=rng.gamma(0.5, 0.01, (L, H)), token_keep_curve=token_curve(rng, L, N, P))
    if scorers:
        s.scorers = {l: (rng.standard_normal(H * Dh).astype(np.float32), 0.1) for l in range(L)}
        s.token_keep_curves = {"cls_attention": s.token_keep_curve, "linear": s.token_keep_curve * 1.1}
    if pairs:
        D, M = H * Dh, 4 * H * Dh
        s.pairs = pairing.pack({f"blocks.{l}.mlp.fc1.weight": fc_entry(rng, f"blocks.{l}.mlp.fc1.weight", M, D,
                                                                        f"blocks.{l}.mlp.fc2.weight") for l in range(L)})
    return s


BUDGETS = [0.0, 1e-4, 0.003, 0.01, 0.03, 0.05, 0.1, 0.3, 1.0]


# ---------------------------------------------------------------------------------------------- budgets
def test_plan_respects_budget_and_matches_independent_counts():
    s = synth()
    curve = pareto(s)
    assert curve.targets == ("heads", "tokens")
    for b in BUDGETS:
        p = plan(s, b, curve=curve)
        assert p.predicted_loss_change <= b + 1e-12
        assert p.budget == b
        # prediction recomputed from the plan alone, through the sensitivities' own helpers
        by_hand = s.predicted_heads(p.heads) if p.heads else 0.0
        prev, tok = 17, 0.0
        for t in p.tokens:
            tok += s.token_keep_curve[t.after_layer, t.keep] - s.token_keep_curve[t.after_layer, prev]
            prev = t.keep
        assert predict(s, p)["total"] == pytest.approx(p.predicted_loss_change, rel=1e-9, abs=1e-15)
        assert by_hand + tok == pytest.approx(p.predicted_loss_change, rel=1e-9, abs=1e-15)
        rep = model_flops(s.meta["geometry"], p)
        assert p.flops_pruned == rep.pruned and p.flops_dense == rep.dense
        assert curve.flops[curve.index_for(b)] == pytest.approx(rep.effective)
        assert p.fingerprint == "fp0" and p.family == "vit" and p.prefix_tokens == 1


def test_more_budget_never_saves_fewer_flops():
    s = synth(seed=3, pairs=True)
    curve = pareto(s, granularity="channel")
    assert np.all(np.diff(curve.flops) < 0)  # every step saves FLOPs
    assert np.all(np.diff(curve.loss) >= -1e-12)  # and costs predicted loss
    grid = np.concatenate([[0.0], np.geomspace(1e-5, curve.loss[-1] * 1.1, 60)])
    flops = [plan(s, b, curve=curve).notes["flops_effective"] for b in grid]
    assert all(f1 >= f2 - 1e-6 for f1, f2 in zip(flops, flops[1:]))
    assert flops[-1] < flops[0]
    assert curve.front()[0] and curve.front()[-1]


def test_heads_only_greedy_is_optimal_by_brute_force():
    """Without tokens every head costs the same FLOPs, so the best plan removes the most heads: brute force."""
    L, H = 2, 4
    s = synth(L=L, H=H, seed=5)
    geo = s.meta["geometry"]
    one = model_flops(geo).dense - model_flops(geo, Plan("x", "vit", geo, heads={0: (0,)})).pruned
    scores = s.head.ravel()
    for b in [0.0, 0.002, 0.005, 0.01, 0.02, 0.05]:
        best = max(len(c) for r in range(L * H + 1) for c in itertools.combinations(range(L * H), r)
                   if scores[list(c)].sum() <= b)
        p = plan(s, b, targets=["heads"])
        assert model_flops(geo).dense - p.flops_pruned == pytest.approx(best * one)


def test_token_stages_monotone_and_configurable():
    s = synth(L=12, H=2, Dh=8, N=33, seed=1)
    assert default_token_layers(12) == (3, 6, 9)
    assert default_token_layers(4) == (1, 2)
    assert default_token_layers(2) == (0,)
    for b in [0.01, 0.05, 0.2, 5.0]:
        p = plan(s, b, targets="tokens")
        keeps = [t.keep for t in p.tokens]
        assert keeps == sorted(keeps, reverse=True)
        assert all(t.after_layer in (3, 6, 9) for t in p.tokens)
        assert all(k >= 2 for k in keeps)
    p = plan(s, 5.0, targets="tokens", token_layers=[1, 4], min_keep=9)
    assert [t.after_layer for t in p.tokens][-1] in (1, 4) and min(t.keep for t in p.tokens) == 9
    with pytest.raises(HeartError, match="out of range"):
        pareto(s, "tokens", token_layers=[11])
    with pytest.raises(HeartError, match="min_keep"):
        pareto(s, "tokens", min_keep=1)


def test_check_budget_rejects_bad_values():
    for bad in (-0.01, float("nan"), float("inf"), MAX_BUDGET * 2, 1e9, "abc", None):
        with pytest.raises(HeartError, match=r"\[0, 20\]"):
            check_budget(bad)
    with pytest.raises(HeartError, match=r"\[0, 20\]"):
        plan(synth(), -1)
    assert check_budget("0.05") == 0.05


def test_targets_errors():
    s = synth()
    with pytest.raises(HeartError, match="unknown target"):
        pareto(s, ["heads", "weights"])
    with pytest.raises(HeartError, match="weight-pair"):
        pareto(s, ["pairs"])
    with pytest.raises(HeartError, match="linear scorer"):
        pareto(s, scorer="linear")


# ---------------------------------------------------------------------------------------------- plans
def test_linear_scorer_fuse_dropped_and_json_round_trip(tmp_path):
    s = synth(pairs=True, scorers=True)
    p = plan(s, 0.05, scorer="linear", fuse_dropped=True, granularity="unstructured")
    assert p.tokens and p.merges and p.token_scorer == "linear" and p.fuse_dropped
    assert set(p.scorers) == {t.after_layer for t in p.tokens}
    w, b = p.scorers[p.tokens[0].after_layer]
    assert np.allclose(w, s.scorers[p.tokens[0].after_layer][0]) and b == pytest.approx(0.1)
    rep = model_flops(s.meta["geometry"], p)
    assert rep.tokens_per_layer[-1] == p.tokens[-1].keep + 1 and rep.overhead > 0
    assert rep.sparse_saved > 0 and p.notes["flops_effective"] == pytest.approx(rep.effective)
    for m in p.merges:
        assert p.anchors[m.weight] == m.weight_sha
    path = p.save(tmp_path / "plan.json")
    q = Plan.load(path)
    assert q == p
    assert q.to_json() == p.to_json()


def test_cnn_channel_pairs_plan():
    rng = np.random.default_rng(0)
    convs = [dict(name="conv1", in_ch=3, out_ch=8, kernel=3, out_hw=16),
             dict(name="conv2", in_ch=8, out_ch=16, kernel=3, out_hw=8), dict(name="fc", in_ch=16, out_ch=10)]
    geo = {"family": "cnn", "layers": 1, "conv_layers": convs}
    e = fc_entry(rng, "conv1.weight", 8, 27, None)
    e["weight"] = e["weight"].reshape(8, 3, 3, 3)
    e["hdiag"] = e["hdiag"].reshape(8, 3, 3, 3)
    e["shape"] = np.array([8, 3, 3, 3])
    e.update({"consumer": np.array("conv2.weight"), "consumer_sha": np.array("c2"), "consumer_shape": np.array([16, 8, 3, 3]),
              "consumer_weight": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
              "consumer_hdiag": rng.gamma(1.0, 1e-3, (16, 8, 3, 3)).astype(np.float32), "consumer_curvature": np.array(1.0)})
    s = Sensitivities(meta={"family": "cnn", "fingerprint": "f", "geometry": geo}, pairs=pairing.pack({"conv1.weight": e}))
    curve = pareto(s, granularity="channel")
    assert curve.targets == ("pairs",)
    p = curve.to_plan(float(curve.loss[-1]))
    (m,) = p.merges
    n = len(m.pruned)
    assert m.granularity == "channel" and n == 7  # 0.9 * 8 rounded, one channel stays
    saved = n * 27 * 256 + 16 * n * 9 * 64  # conv1 rows and conv2 input columns, by hand
    assert p.flops_dense - p.flops_pruned == 2 * saved


def test_language_model_heads_only():
    geo = dict(family="gpt_neox", layers=2, heads=4, head_dim=8, hidden=32, seq_len=None, prefix_tokens=0, vocab=64,
               mlp_hidden=128)
    s = Sensitivities(meta={"family": "gpt_neox", "fingerprint": "f", "geometry": geo},
                      head=np.random.default_rng(0).gamma(0.5, 0.01, (2, 4)))
    with pytest.raises(HeartError, match="seq_len"):
        pareto(s)
    p = plan(s, 0.01, seq_len=64)
    assert p.tokens == () and p.notes["seq_len"] == 64
    assert p.flops_pruned == model_flops(geo, p, seq_len=64).pruned
    s.token_keep_curve = np.zeros((2, 65))
    with pytest.raises(HeartError, match="language models"):
        pareto(s, ["tokens"], seq_len=64)


def test_calibrate_recovers_factors():
    s = synth(seed=2)
    curve = pareto(s)
    plans = [curve.to_plan(b) for b in (0.005, 0.01, 0.03, 0.1, 0.2)]
    measured = []
    for p in plans:
        x = predict(s, p, calibrated=False)
        measured.append((p, 1.5 * x["heads"] + 0.7 * x["tokens"]))
    cal = calibrate(s, measured)
    assert cal["heads"] == pytest.approx(1.5, rel=1e-6) and cal["tokens"] == pytest.approx(0.7, rel=1e-6)
    assert cal["max_rel_error"] < 1e-6 and s.meta["calibration"]["n"] == 5
    for p, m in measured:  # calibrated predictions now equal the measurements
        assert predict(s, p)["total"] == pytest.approx(m, rel=1e-6)
    p = plan(s, 0.05)
    assert p.predicted_loss_change <= 0.05 and p.notes["calibration"] == {"heads": pytest.approx(1.5), "tokens": pytest.approx(0.7)}
    with pytest.raises(HeartError):
        calibrate(s, [])


def test_calibration_survives_save_load(tmp_path):
    s = synth()
    calibrate(s, [({"heads": 0.01, "tokens": 0.02}, 0.06), ({"heads": 0.02, "tokens": 0.01}, 0.06)])
    assert s.meta["calibration"]["heads"] == pytest.approx(2.0) and s.meta["calibration"]["tokens"] == pytest.approx(2.0)
    s.save(tmp_path / "s.npz")
    t = Sensitivities.load(tmp_path / "s.npz")
    assert plan(t, 0.05).predicted_loss_change == pytest.approx(plan(s, 0.05).predicted_loss_change)


def test_refine_fills_leftover_budget():
    s = synth(seed=4, pairs=True)
    for b in (0.01, 0.05):
        a, r = plan(s, b, granularity="channel"), plan(s, b, granularity="channel", refine=True)
        assert r.predicted_loss_change <= b + 1e-12
        assert r.notes["flops_effective"] <= a.notes["flops_effective"]


def test_vit_b16_curve_is_fast():
    """The whole heads+tokens curve for ViT-B/16 (12x12 heads, 197 tokens): target < 100 ms; assert 10x that."""
    geo = dict(family="vit", layers=12, heads=12, head_dim=64, hidden=768, seq_len=197, prefix_tokens=1, patch_size=16,
               num_classes=1000)
    s = synth(L=12, H=12, Dh=64, N=197, geo=geo)
    pareto(s)  # warm
    t = time.perf_counter()
    curve = pareto(s)
    dt = time.perf_counter() - t
    assert len(curve) > 300
    assert dt < 1.0, f"pareto took {dt:.3f} s"


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_plan(tmp_path, capsys):
    s = synth(scorers=True)
    sp = s.save(tmp_path / "sens.npz")
    out = tmp_path / "plan.json"
    assert main(["plan", str(sp), "--budget", "0.05", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "predicted loss change" in text and "FLOPs" in text and "tokens kept" in text
    p = Plan.load(out)
    assert p.budget == 0.05 and p.predicted_loss_change <= 0.05
    assert main(["plan", str(sp), "--budget", "0.05", "-o", str(out), "--targets", "heads", "--scorer", "linear",
                 "--fuse-dropped", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["tokens"] == [] and d["budget"] == 0.05 and d["flops_pruned"] < d["flops_dense"]
    for bad in ("-1", "nan", "1e9", "lots"):
        assert main(["plan", str(sp), "--budget", bad, "-o", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "[0, 20]" in err and "Traceback" not in err
    assert main(["plan", str(tmp_path / "missing.npz"), "--budget", "0.1", "-o", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_power_calibration_recovers_superadditive_growth():
    s = synth(seed=6)
    heads_only, tokens_only = pareto(s, "heads"), pareto(s, "tokens")
    measured = []
    for b in (0.003, 0.01, 0.03, 0.1):
        for c, (k, g) in ((heads_only, ("heads", 1.3)), (tokens_only, ("tokens", 1.0))):
            p = c.to_plan(b)
            x = predict(s, p, calibrated=False)[k]
            measured.append((p, (3.0 if k == "heads" else 0.5) * x ** g))
    cal = calibrate(s, measured, model="power")
    assert cal["heads"] == pytest.approx(3.0, rel=1e-6) and cal["exponents"]["heads"] == pytest.approx(1.3, rel=1e-6)
    assert cal["tokens"] == pytest.approx(0.5, rel=1e-6) and cal["exponents"]["tokens"] == pytest.approx(1.0, abs=1e-6)
    for p, m in measured:
        assert predict(s, p)["total"] == pytest.approx(m, rel=1e-6)
    curve = pareto(s)
    assert np.all(np.diff(curve.loss) >= -1e-12)
    for b in (0.01, 0.05, 0.2):
        p = curve.to_plan(b)
        assert p.predicted_loss_change <= b + 1e-12
        assert predict(s, p)["total"] == pytest.approx(p.predicted_loss_change, rel=1e-9)
    with pytest.raises(HeartError, match="only one target"):
        calibrate(synth(), [({"heads": 0.01, "tokens": 0.01}, 0.05)], model="power")


def test_token_moves_reach_first_stage_and_keep_curve_monotone():
    # a cheap later stage fills first; once the last stage keeps min_keep, tokens steps move drops to earlier
    # stages (budget._Problem._token_move). A move may lower the predicted loss: the curve then drops the points
    # it dominates (Action.before), so the raw loss stays monotone and every point is still its plan's prediction.
    from heart_onnx.flops_target import plan_at

    folded = 0
    for seed in range(6):
        s = synth(L=4, N=17, seed=seed)
        rng = np.random.default_rng(100 + seed)
        c = s.token_keep_curve.copy()
        c[rng.integers(1, 3)] *= rng.uniform(1e-3, 0.3)
        s.token_keep_curve = c
        for fuse in (False, True):
            for targets in (["tokens"], ["heads", "tokens"]):
                cv = pareto(s, targets, fuse_dropped=fuse)
                folded += sum(1 for a in cv.actions if a.before)
                assert np.all(np.diff(cv.loss) >= 0) and np.all(np.diff(cv.flops) < 0)
                for i in range(len(cv)):  # independent FLOPs count and prediction of each point's plan
                    p = plan_at(cv, i)
                    assert abs(model_flops(s.meta["geometry"], p).pruned - cv.flops[i]) < 1e-9 * cv.flops[0]
                    assert abs(predict(s, p)["total"] - cv.loss[i]) < 1e-12 + 1e-9 * cv.loss[i]
                if targets == ["tokens"]:  # the end of a tokens-only curve: the first stage keeps min_keep
                    first = plan_at(cv, len(cv) - 1).tokens[0]
                    assert (first.after_layer, first.keep) == (1, 2)
    assert folded > 0  # the fold was exercised
