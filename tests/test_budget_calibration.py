"""Stage-2 calibration: the monotone log-log loss map, the planner using it, and the demo ViT's promise
(calibrated predictions agree with held-out measurement)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from heart_onnx import budget as B
from heart_onnx.errors import HeartError
from heart_onnx.loss_map import MAX_SLOPE, MIN_SLOPE, LossMap
from heart_onnx.sensitivities import Sensitivities

from test_budget import synth


# ------------------------------------------------------------------------------------------ the map
def test_loss_map_exact_at_points_monotone_and_power_law_beyond():
    rng = np.random.default_rng(0)
    raw = np.sort(rng.uniform(1e-3, 1.0, 7))
    meas = 3.0 * raw ** 1.4 * np.exp(np.cumsum(rng.uniform(0, 0.2, 7)))  # increasing, not a power law
    m = LossMap.fit(raw[::-1], meas[::-1])  # order of the points does not matter
    np.testing.assert_allclose(m(raw), meas, rtol=1e-5)  # exact at the measured points (ties step 1e-6)
    xs = np.geomspace(1e-6, 1e3, 400)
    ys = m(xs)
    assert np.all(np.diff(ys) > 0) and m(0.0) == 0.0 and m(-1.0) == 0.0
    # between two knots: the straight line in log-log
    mid = math.sqrt(raw[2] * raw[3])
    assert m(mid) == pytest.approx(math.sqrt(meas[2] * meas[3]), rel=1e-5)
    # beyond the ends: power laws with the slope of a line through the 3 end points
    g_hi = np.polyfit(np.log(raw[-3:]), np.log(meas[-3:]), 1)[0]
    g_lo = np.polyfit(np.log(raw[:3]), np.log(meas[:3]), 1)[0]
    assert m(raw[-1] * 10) == pytest.approx(meas[-1] * 10 ** g_hi, rel=1e-4)
    assert m(raw[0] / 10) == pytest.approx(meas[0] * 0.1 ** g_lo, rel=1e-4)
    # inverse
    np.testing.assert_allclose(m.inverse(m(xs)), xs, rtol=1e-9)
    assert m.inverse(0.0) == 0.0 and m.inverse(float("inf")) == float("inf")


def test_loss_map_noisy_points_isotonic_and_single_point():
    m = LossMap.fit([0.01, 0.02, 0.04, 0.08], [0.02, 0.05, 0.03, 0.2])  # one violator
    f = m.fitted
    assert np.all(np.diff(f) > 0)
    pooled = math.exp((math.log(0.05) + math.log(0.03)) / 2)  # PAV in log space: geometric mean of the pair
    assert f[1] == pytest.approx(pooled, rel=1e-5) and f[2] == pytest.approx(pooled, rel=1e-5)
    assert f[0] == pytest.approx(0.02) and f[3] == pytest.approx(0.2, rel=1e-5)
    one = LossMap.fit([0.1], [0.3])  # a pure factor
    assert one(0.01) == pytest.approx(0.03) and one(1.0) == pytest.approx(3.0)
    steep = LossMap.fit([0.1, 0.2], [1e-6, 1.0])  # end slopes clamped
    assert steep.slope_hi == MAX_SLOPE and LossMap.fit([0.1, 0.2], [1.0, 1.0]).slope_lo == pytest.approx(MIN_SLOPE)
    with pytest.raises(HeartError, match="at least one"):
        LossMap.fit([0.0, -1.0], [0.1, 0.2])
    with pytest.raises(HeartError, match="strictly increasing"):
        LossMap.from_dict({"raw": [0.1, 0.05], "fitted": [0.1, 0.2]})


# ------------------------------------------------------------------------------------ the planner
def _with_curves(s, scale=3.0, power=1.3):
    """Stage-2 curves for every target set: measured = scale * raw ** power at 6 points of each curve."""
    for ts in (["heads"], ["tokens"], ["heads", "tokens"]):
        c = B.pareto(s, ts)
        idx = np.unique(np.linspace(1, len(c) - 1, 6).round().astype(int))
        raw = c.loss[idx]
        B.calibrate_curve(s, ts, raw, scale * raw ** power)
    return s


def test_planner_applies_the_target_sets_map_and_json_round_trip(tmp_path):
    s0 = synth(seed=3)
    s = _with_curves(copy.deepcopy(s0))
    assert set(s.meta["calibration"]["curves"]) == {"heads", "tokens", "heads,tokens"}
    for ts in (["heads"], ["tokens"], ["heads", "tokens"]):
        c0, c1 = B.pareto(s0, ts), B.pareto(s, ts)
        assert c0.actions == tuple((a.__class__(a.kind, a.layer, a.index, a0.dloss, a.dflops, a.name)
                                    for a, a0 in zip(c1.actions, c0.actions)))  # same path
        np.testing.assert_array_equal(c1.raw_loss, c0.loss)
        lmap = B.calibration_map(s, ts)
        np.testing.assert_allclose(c1.loss, lmap(c0.loss), rtol=1e-12)
        np.testing.assert_allclose(np.diff(c1.loss), [a.dloss for a in c1.actions], rtol=1e-9, atol=1e-15)
        for b in (0.01, 0.05, 0.2):
            p = c1.to_plan(b)
            assert p.predicted_loss_change <= b * (1 + 1e-9)
            assert p.predicted_loss_change == pytest.approx(lmap(c0.loss[c1.index_for(b)]), rel=1e-9)
            # the same point as the stage-1 curve at the budget mapped back to the raw scale
            assert c1.index_for(b) == c0.index_for(lmap.inverse(b) * (1 + 1e-12))
            pr = B.predict(s, p)
            assert pr["total"] == pytest.approx(p.predicted_loss_change, rel=1e-9)
            assert pr["heads"] + pr["tokens"] == pytest.approx(pr["total"], rel=1e-9)
            assert B.predict(s, p, calibrated=False)["total"] == pytest.approx(B.predict(s0, p, calibrated=False)["total"])
            rp = c1.to_plan(b, refine=True)
            assert rp.predicted_loss_change <= b * (1 + 1e-9) and rp.flops_pruned <= p.flops_pruned
    # JSON through the .npz file
    s.save(tmp_path / "s.sens.npz")
    back = Sensitivities.load(tmp_path / "s.sens.npz")
    assert back.meta["calibration"]["curves"] == s.meta["calibration"]["curves"]
    for ts in (["heads"], ["heads", "tokens"]):
        np.testing.assert_array_equal(B.pareto(back, ts).loss, B.pareto(s, ts).loss)
    # re-fitting stage 1 drops the curves (their raw axis changed)
    B.calibrate(back, [({"heads": 0.01}, 0.02), ({"heads": 0.02}, 0.05)], model="power")
    assert "curves" not in back.meta["calibration"] and B.calibration_map(back, ["heads"]) is None


def test_predict_picks_the_plans_target_set():
    s = _with_curves(synth(seed=4), scale=2.0, power=1.0)
    s.meta["calibration"]["curves"]["heads,tokens"] = LossMap.fit([1e-3, 1.0], [5e-3, 5.0]).to_dict()  # x5
    c = B.pareto(s, ["heads", "tokens"])
    p = c.to_plan(0.05)
    raw = B.predict(s, p, calibrated=False)["total"]
    assert B.predict(s, p)["total"] == pytest.approx(5 * raw, rel=1e-6)  # notes["targets"] -> joint map
    bare = p.replace(notes={})
    pruned = [t for t in ("heads", "tokens") if (t == "heads" and p.heads) or (t == "tokens" and p.tokens)]
    factor = 5.0 if len(pruned) == 2 else 2.0
    assert B.predict(s, bare)["total"] == pytest.approx(factor * raw, rel=1e-6)


# ------------------------------------------------------------------------------------- demo promise
def test_demo_vit_calibrated_predictions_match_heldout(tmp_path):
    """Sensitivities and calibration on the val split; held-out (test split) KL within a factor 2 of the
    prediction at two budgets (the benchmark measures +-30%; factor 2 keeps this test robust)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    from heart_onnx.calibration import calibrate_on_data, measured_kl
    from heart_onnx.data import load_data
    from heart_onnx.models.demo import demo_vit, digits_split, digits_val
    from heart_onnx.sensitivity.api import analyze

    model = demo_vit()
    sens = analyze(model, load_data("digits:val", model, n=96, batch_size=32), targets=("heads", "tokens"))
    x_val, _ = digits_val()
    cal = calibrate_on_data(model, sens, x_val)
    assert set(cal["curves"]) == {"heads", "tokens", "heads,tokens"}
    sens.save(tmp_path / "d.sens.npz")
    sens = Sensitivities.load(tmp_path / "d.sens.npz")
    _, _, x_te, _ = digits_split()
    with torch.no_grad():
        dense = model(x_te)
    curve = B.pareto(sens, ["heads", "tokens"])
    for b in (0.02, 0.1):
        p = curve.to_plan(b)
        pred = p.predicted_loss_change
        # the plan is the curve's last point within the budget (the curve's raw loss is monotone); how much of
        # the budget it uses depends on the step sizes of the curve, not on the calibration
        fits = np.flatnonzero(np.asarray(curve.loss) <= b * (1 + 1e-9))
        assert 0 < pred <= b * (1 + 1e-9) and pred == pytest.approx(float(curve.loss[fits[-1]]), rel=1e-9)
        meas = measured_kl(model, p, x_te, dense)
        assert 0.5 <= meas / pred <= 2.0, (b, pred, meas)


def test_cli_analyze_calibrate_then_plan(tmp_path, capsys):
    """``analyze --calibrate digits:val`` stores the loss maps; ``plan`` then predicts what the plan measures on
    those images (recomputed here by hand with masking) within the map's interpolation error."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    from heart_onnx.cli.main import main
    from heart_onnx.models.demo import demo_vit, digits_val
    from heart_onnx.models.masking import apply_plan
    from heart_onnx.plan import Plan

    sens_path, plan_path = tmp_path / "s.npz", tmp_path / "p.json"
    assert main(["analyze", "--model", "demo-vit", "--data", "digits:val", "-n", "64", "--calibrate", "digits:val",
                 "-o", str(sens_path), "--json"]) == 0
    s = Sensitivities.load(sens_path)
    assert set(s.meta["calibration"]["curves"]) == {"heads", "tokens", "heads,tokens"}
    assert s.meta["calibration_data"] == "digits:val"
    capsys.readouterr()
    assert main(["plan", str(sens_path), "--budget", "0.1", "-o", str(plan_path), "--json"]) == 0
    p = Plan.load(plan_path)
    assert p.notes["calibration_curve"] == "heads,tokens" and 0 < p.predicted_loss_change <= 0.1 * (1 + 1e-9)
    model = demo_vit()
    x, _ = digits_val()
    x = x[:64]
    with torch.no_grad():
        lq = torch.log_softmax(model(x), -1)  # (64, 10) dense
        with apply_plan(model, p) as masked:
            lp = torch.log_softmax(masked.forward(x), -1)  # (64, 10) pruned
    meas = float((lq.exp() * (lq - lp)).sum(-1).mean())
    assert 1 / 1.6 <= meas / p.predicted_loss_change <= 1.6
