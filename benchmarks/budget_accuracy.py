"""Does the loss budget keep its promise? Predicted vs measured held-out loss change on the demo ViT.

    OMP_NUM_THREADS=1 python benchmarks/budget_accuracy.py artifacts/budget_accuracy.json

Protocol:
- Model: the shipped demo ViT (``heart_onnx.models.demo``). Sensitivities (``analyze``, heads + tokens,
  default probes, seed 0) on the first ``--n-sens`` (default 128) images of the ``val`` split; the planner
  is calibrated (``calibrate_on_data``, ``--points`` plans per curve) on all 300 ``val`` images. The demo
  models never trained on ``val`` or on the test split.
- For each target set {heads, tokens, heads+tokens} and budget {0.01, 0.02, 0.05, 0.1, 0.2} nats: the
  plan ``budget.pareto(sens, set).to_plan(budget)``; *predicted* = its ``predicted_loss_change``;
  *measured* = mean KL(dense || plan applied by masking) over the 450 held-out test images; *ratio* =
  measured / predicted; *se* = bootstrap standard error of the measured mean (``--boot`` resamples of the
  450 per-image KLs, seed 0); *ratio_se* = se / predicted; *flops_ratio* = pruned / dense FLOPs. The same
  plan measured on the 300 val images (``measured_val``, ``se_val``): the calibration is fitted there, so
  val -> held-out sampling noise is in both; *ratio_se_combined* = ratio * hypot(se / measured,
  se_val / measured_val) is the uncertainty of the ratio from both samples.
- Predictors, each planning its own curve: ``calibrated`` (both stages: per-target power law + the target
  set's measured loss map, the planner's default), ``stage1`` (per-target power law only: the previous
  calibration), ``uncalibrated`` (raw second-order sums).
- ``--points-sweep 3,4,6,8,12``: for each number of calibration points, the calibration's wall time, the
  calibrated predictor's held-out accuracy (mean and worst |log ratio| over the 15 cells) and its
  interpolation error on the val images themselves at every curve point predicted in [0.005, 0.3] nats
  (``val_interpolation``): how ``points`` was chosen. Held-out misses that remain when the val
  interpolation error is ~0 are val -> held-out sampling noise (compare with ``ratio_se``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heart_onnx import budget as B  # noqa: E402
from heart_onnx.calibration import calibrate_on_data  # noqa: E402
from heart_onnx.data import load_data  # noqa: E402
from heart_onnx.models.demo import demo_vit, digits_split, digits_val  # noqa: E402
from heart_onnx.models.masking import apply_plan  # noqa: E402
from heart_onnx.sensitivity.api import analyze  # noqa: E402

BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2)
SETS = (("heads",), ("tokens",), ("heads", "tokens"))


def per_image_kl(model, plan, x, dense) -> np.ndarray:
    """KL(dense || pruned) of each input, (N,) nats."""
    with torch.no_grad(), apply_plan(model, plan) as masked:
        lp = F.log_softmax(masked.forward(x), -1)  # (N, C)
    lq = F.log_softmax(dense, -1)
    return (lq.exp() * (lq - lp)).sum(-1).numpy()


def bootstrap_se(v: np.ndarray, reps: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(reps, len(v)))
    return float(v[idx].mean(1).std(ddof=1))


def table(model, sens, x, dense, boot: int, x_val=None, dense_val=None) -> list[dict]:
    rows = []
    for ts in SETS:
        curve = B.pareto(sens, list(ts))
        for b in BUDGETS:
            plan = curve.to_plan(b)
            kl = per_image_kl(model, plan, x, dense)
            pred = float(plan.predicted_loss_change or 0.0)
            meas = float(kl.mean())
            se = bootstrap_se(kl, boot)
            rows.append({
                "targets": "+".join(ts), "budget": b, "predicted": pred, "measured": meas,
                "ratio": meas / pred if pred > 0 else None, "se": se, "ratio_se": se / pred if pred > 0 else None,
                "flops_ratio": float(plan.flops_pruned / plan.flops_dense), "heads_removed": sum(len(v) for v in plan.heads.values()),
                "token_keeps": [[t.after_layer, t.keep] for t in plan.tokens],
            })
            if x_val is not None:  # the same plan on the calibration images: the other half of the noise
                kv = per_image_kl(model, plan, x_val, dense_val)
                r = rows[-1]
                r["measured_val"], r["se_val"] = float(kv.mean()), bootstrap_se(kv, boot)
                if pred > 0 and meas > 0 and r["measured_val"] > 0:
                    rel = math.hypot(se / meas, r["se_val"] / r["measured_val"])
                    r["ratio_se_combined"] = r["ratio"] * rel
    return rows


def val_interpolation(model, sens, x_val, dense_val, lo: float = 0.005, hi: float = 0.3) -> dict:
    """Interpolation error of the calibrated map on the calibration (val) images themselves: |log(pred /
    measured)| at every point of each target set's curve with prediction in [lo, hi] (mean, max, count).
    This separates the map's error (fewer points, coarser interpolation) from val -> held-out sampling noise."""
    out = {}
    for ts in SETS:
        curve = B.pareto(sens, list(ts))
        errs = []
        for i in range(1, len(curve)):
            pred = float(curve.loss[i])
            if lo <= pred <= hi:
                plan = curve.to_plan(pred * (1 + 1e-9) + 1e-15)
                m = float(per_image_kl(model, plan, x_val, dense_val).mean())
                if m > 0:
                    errs.append(abs(math.log(pred / m)))
        out["+".join(ts)] = {"mean_abs_log": float(np.mean(errs)) if errs else None,
                             "max_factor": float(math.exp(max(errs))) if errs else None, "n": len(errs)}
    return out


def _score(rows: list[dict], targets: str | None = None) -> dict:
    lr = [abs(math.log(r["ratio"])) for r in rows if r["ratio"] and (targets is None or r["targets"] == targets)]
    return {"mean_abs_log_ratio": float(np.mean(lr)), "worst_ratio_factor": float(math.exp(max(lr)))} if lr else {}


def _resplit_stats(cells: list[dict]) -> dict:
    """Measured / predicted over resplit cells: median, geometric mean, share within +-30%, the same share
    for the noise floor (held-out / calibration measurement), p10..p90."""
    rs, fl = np.array([c["ratio"] for c in cells]), np.array([c["floor_ratio"] for c in cells])
    return {"cells": len(rs), "median_ratio": float(np.median(rs)), "geomean_ratio": float(np.exp(np.log(rs).mean())),
            "within_30pct": float(np.mean(np.abs(rs - 1) <= 0.3)),
            "floor_within_30pct": float(np.mean(np.abs(fl - 1) <= 0.3)),
            "ratio_p10_p90": [float(np.percentile(rs, 10)), float(np.percentile(rs, 90))]}


def resplits(model, n: int, n_sens: int, points: int, disjoint: bool = False) -> dict:
    """The protocol rerun on ``n`` random 300/450 re-splits of val + test (module docstring, ``--resplits``)."""
    _, _, x_te, y_te = digits_split()
    x_val, y_val = digits_val()
    x_pool, y_pool = torch.cat([x_val, x_te]), torch.cat([y_val, y_te])  # (750, 1, 8, 8), (750,)
    n_cal = len(x_val)
    cells = []
    for r in range(n):
        perm = torch.from_numpy(np.random.default_rng(1000 + r).permutation(len(x_pool)))
        cal, held = perm[:n_cal], perm[n_cal:]
        xc, yc, xh = x_pool[cal], y_pool[cal], x_pool[held]
        batches = [(xc[i:i + 32], yc[i:i + 32]) for i in range(0, n_sens, 32)]
        t0 = time.perf_counter()
        sens = analyze(model, batches, targets=("heads", "tokens"), seed=r)
        calibrate_on_data(model, sens, xc[n_sens:] if disjoint else xc, points=points)
        with torch.no_grad():
            dense_c, dense_h = model(xc), model(xh)  # (300, 10), (450, 10)
        for ts in SETS:
            curve = B.pareto(sens, list(ts))
            for b in BUDGETS:
                plan = curve.to_plan(b)
                pred = float(plan.predicted_loss_change or 0.0)
                meas = float(per_image_kl(model, plan, xh, dense_h).mean())
                meas_cal = float(per_image_kl(model, plan, xc, dense_c).mean())
                if pred > 0 and meas > 0 and meas_cal > 0:
                    cells.append({"resplit": r, "targets": "+".join(ts), "budget": b, "predicted": pred,
                                  "measured": meas, "measured_calibration": meas_cal,
                                  "ratio": meas / pred, "floor_ratio": meas / meas_cal})
        print(f"resplit {r}: {time.perf_counter() - t0:.1f} s", flush=True)
    summary = {str(b): _resplit_stats([c for c in cells if c["budget"] == b]) for b in BUDGETS
               if any(c["budget"] == b for c in cells)}
    summary["all"] = _resplit_stats(cells)
    print("| budget | cells | median ratio | geomean ratio | within +-30% | noise floor within +-30% | ratio p10..p90 |")
    print("|---|---|---|---|---|---|---|")
    for k, v in summary.items():
        if k != "all":
            print(f"| {k} | {v['cells']} | {v['median_ratio']:.2f} | {v['geomean_ratio']:.2f} | {v['within_30pct']:.2f} "
                  f"| {v['floor_within_30pct']:.2f} | {v['ratio_p10_p90'][0]:.2f}..{v['ratio_p10_p90'][1]:.2f} |")
    print("all", summary["all"])
    return {"n": n, "summary": summary, "cells": cells}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="artifacts/budget_accuracy.json", help="JSON output (default artifacts/budget_accuracy.json)")
    ap.add_argument("--n-sens", type=int, default=128, help="val images for the sensitivities (default 128)")
    ap.add_argument("--points", type=int, default=12, help="calibration plans per curve (default 12, as calibrate_on_data)")
    ap.add_argument("--points-sweep", default="", help="comma list of point counts to compare (default: none)")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="sensitivity probe seed (default 0)")
    ap.add_argument("--resplits", type=int, default=0, help="random val+test re-splits to rerun the protocol on (default 0)")
    ap.add_argument("--resplit-disjoint", action="store_true", help="in resplits, calibrate on images the sensitivities did not see")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = demo_vit()
    _, _, x_te, _ = digits_split()
    x_val, _ = digits_val()
    with torch.no_grad():
        dense = model(x_te)  # (450, 10)
    t0 = time.perf_counter()
    sens = analyze(model, load_data("digits:val", model, n=args.n_sens, batch_size=32), targets=("heads", "tokens"), seed=args.seed)
    t_sens = time.perf_counter() - t0
    raw = copy.deepcopy(sens)
    t0 = time.perf_counter()
    cal = calibrate_on_data(model, sens, x_val, points=args.points)
    t_cal = time.perf_counter() - t0
    stage1 = copy.deepcopy(sens)
    stage1.meta["calibration"] = {k: v for k, v in sens.meta["calibration"].items() if k != "curves"}
    result = {
        "protocol": __doc__.split("Protocol:")[1].strip(),
        "command": "OMP_NUM_THREADS=1 python benchmarks/budget_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
        "n_sens": args.n_sens, "n_calibration": len(x_val), "n_heldout": len(x_te), "points": args.points,
        "analyze_seconds": t_sens, "calibrate_seconds": t_cal,
        "calibration": {k: v for k, v in cal.items() if k != "points"},
        "predictors": {},
    }
    with torch.no_grad():
        dense_val = model(x_val)  # (300, 10)
    for name, s in (("calibrated", sens), ("stage1", stage1), ("uncalibrated", raw)):
        rows = table(model, s, x_te, dense, args.boot, x_val, dense_val)
        result["predictors"][name] = {"rows": rows, "score": _score(rows), "score_heads+tokens": _score(rows, "heads+tokens")}
        print(f"\n== {name}")
        print("| targets | budget | predicted | measured held-out ± SE | measured val ± SE | ratio | ratio SE (held-out) "
              "| ratio SE (held-out + val) | FLOPs ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
            rse = f"{r['ratio_se']:.2f}" if r["ratio_se"] else "-"
            rsc = f"{r['ratio_se_combined']:.2f}" if r.get("ratio_se_combined") else "-"
            print(f"| {r['targets']} | {r['budget']:g} | {r['predicted']:.4f} | {r['measured']:.4f} ± {r['se']:.4f} "
                  f"| {r['measured_val']:.4f} ± {r['se_val']:.4f} | {ratio} | {rse} | {rsc} | {r['flops_ratio']:.3f} |")
        print("score", result["predictors"][name]["score"], "heads+tokens", result["predictors"][name]["score_heads+tokens"])
    if args.points_sweep:
        sweep = []
        for p in [int(v) for v in args.points_sweep.split(",") if v.strip()]:
            s = copy.deepcopy(raw)
            t0 = time.perf_counter()
            calibrate_on_data(model, s, x_val, points=p)
            dt = time.perf_counter() - t0
            rows = table(model, s, x_te, dense, 200)
            sweep.append({"points": p, "calibrate_seconds": dt, **_score(rows),
                          "heads+tokens": _score(rows, "heads+tokens"),
                          "val_interpolation": val_interpolation(model, s, x_val, dense_val)})
            print("points sweep", sweep[-1])
        result["points_sweep"] = sweep
    if args.resplits:
        result["resplits"] = resplits(model, args.resplits, args.n_sens, args.points, args.resplit_disjoint)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
