"""How well do second-order sensitivities predict the MEASURED loss of pruning? (demo ViT, digits)

Protocol
--------
- Model: the shipped demo ViT (``heart_onnx.models.demo.demo_vit()``, trained on digits; 4 blocks x 8 heads,
  17 tokens). Loss: KL(dense || pruned) of the predictive distribution, per input, mean over inputs (nats).
- Predictions from the calibration split (``digits:calib``, 256 images); measurements on the held-out
  test split (``digits_split()`` test, first ``--n-test`` images).
- Heads: predicted mean loss of removing each single head (Hessian, probes and exact; baselines
  magnitude / Taylor / Fisher (labelled CE) / random) vs the measured mean loss of removing it on the
  test images: Spearman over the L*H heads.
- Estimators: the default (``estimator="ggn"`` for the KL loss: output-space gradients, exact for the 10
  digits classes) and random-sign HVP probes (``estimator="hvp"``).
- Probes: Spearman between the HVP probe estimate (1..64 probes) and the exact per-component HVPs, for the
  aggregated head scores and for per-input token scores (``--n-probe-inputs`` calibration images).
- Tokens, single: per input, predicted score of dropping each token after block l (l < L-1) vs the
  measured loss of dropping it; Spearman per (input, layer), averaged. Hessian gate (default), HEART-ViT
  hidden-state erasure, and the baselines (cls attention, magnitude, Fisher, random) on the same inputs.
- Tokens, groups: for each layer l < L-1 and keep count K, the predicted keep curve of the cls-attention
  scorer (and the linear scorer) from the calibration split (sum of single-token scores, the default
  curve) vs the measured mean loss on test images of dropping the N-K tokens that scorer drops; Spearman
  over all (l, K) and the median ratio measured/predicted; also the group's full Gauss-Newton quadratic
  (``<scorer>_group`` curves, cross terms included) and the single-token sum on the test images themselves.

    OMP_NUM_THREADS=1 python benchmarks/sensitivity_quality.py --out artifacts/sensitivity_quality.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heart_onnx.models import demo  # noqa: E402
from heart_onnx.models.registry import adapt  # noqa: E402
from heart_onnx.sensitivity import measure  # noqa: E402
from heart_onnx.sensitivity.api import analyze  # noqa: E402
from heart_onnx.sensitivity.scorers import cls_attention_scores, linear_scores, spearman  # noqa: E402
from heart_onnx.sensitivity.tokens import drop_order  # noqa: E402


def batches(x, y, bs):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/sensitivity_quality.json")
    ap.add_argument("--weights", default=None, help="demo ViT weights (default: the shipped ones)")
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--n-probe-inputs", type=int, default=32)
    ap.add_argument("--n-token-inputs", type=int, default=24)
    ap.add_argument("--probes", type=int, default=None, help="probe count for the main head/token runs (default: analyze's)")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    model = demo.demo_vit(pretrained=args.weights is None, weights=args.weights)
    a = adapt(model)
    xc, yc = demo.digits_calibration()
    xc, yc = xc[:args.n_calib], yc[:args.n_calib]
    _, _, xt, yt = demo.digits_split()
    xt, yt = xt[:args.n_test], yt[:args.n_test]
    calib = batches(xc, yc, args.batch)
    kw = {} if args.probes is None else {"probes": args.probes}
    res: dict = {"protocol": __doc__.split("Protocol")[1].strip(), "model": "demo_vit", "n_calib": len(xc),
                 "n_test": len(xt), "torch": torch.__version__, "python": platform.python_version(),
                 "machine": platform.machine(), "threads": torch.get_num_threads()}

    # ---------------------------------------------------------------- heads
    meas = np.concatenate([measure.single_head_losses(a, xb) for xb, _ in batches(xt, yt, 64)], 0).mean(0)  # (L, H)
    heads = {}
    hs = analyze(a, calib, targets=("heads",), **kw)
    res["default_probes"] = hs.meta["probes"]
    res["default_estimator"] = hs.meta["estimator"]
    heads["hessian"] = hs.head
    heads["hessian_hvp_probes"] = analyze(a, calib, targets=("heads",), estimator="hvp", **kw).head
    heads["hessian_exact"] = analyze(a, calib, targets=("heads",), exact=True).head
    for m in ("magnitude", "taylor", "fisher", "random"):
        heads[m] = analyze(a, calib, targets=("heads",), method=m).head
    res["heads"] = {k: {"spearman_vs_measured": float(spearman(v.ravel(), meas.ravel()))} for k, v in heads.items()}
    res["heads"]["measured_mean_loss"] = meas.tolist()
    res["heads"]["hessian_exact_pred"] = heads["hessian_exact"].tolist()
    print("heads", {k: v for k, v in res["heads"].items() if isinstance(v, dict)}, flush=True)

    # ---------------------------------------------------------------- probes vs exact
    sub = batches(xc[:args.n_probe_inputs], yc[:args.n_probe_inputs], args.batch)
    ex = analyze(a, sub, targets=("heads", "tokens"), exact=True, holdout=0)
    curve = {}
    L = a.num_layers
    for k in (1, 2, 4, 8, 16, 32, 64):
        pr = analyze(a, sub, targets=("heads", "tokens"), probes=k, holdout=0, seed=1, estimator="hvp")
        tok_sp = spearman(pr.token_per_input[:, :L - 1, 1:], ex.token_per_input[:, :L - 1, 1:])
        curve[k] = {"head_spearman": float(spearman(pr.head.ravel(), ex.head.ravel())),
                    "head_per_input_spearman": float(np.nanmean(spearman(pr.head_per_input.reshape(len(pr.head_per_input), -1),
                                                                         ex.head_per_input.reshape(len(ex.head_per_input), -1)))),
                    "token_per_input_spearman": float(np.nanmean(tok_sp)),
                    "head_negative_fraction": float((pr.head < 0).mean())}
        print("probes", k, curve[k], flush=True)
    res["probes_vs_exact"] = {"n_inputs": args.n_probe_inputs, "curve": curve}

    # ---------------------------------------------------------------- single tokens (held-out inputs)
    n = args.n_token_inputs
    xs, ys = xt[:n], yt[:n]
    P, N = a.prefix_tokens, a.seq_len
    m_tok = np.zeros((n, L - 1, N - P))
    for l in range(L - 1):
        for t in range(P, N):
            m_tok[:, l, t - P] = measure.token_drop_losses(a, xs, l, torch.full((n, 1), t))
    preds = {
        "hessian_gate": analyze(a, [(xs, ys)], targets=("tokens",), holdout=0, **kw).token_per_input,
        "hessian_gate_hvp_probes": analyze(a, [(xs, ys)], targets=("tokens",), holdout=0, estimator="hvp", **kw).token_per_input,
        "hessian_gate_exact_hvp": analyze(a, [(xs, ys)], targets=("tokens",), holdout=0, exact=True).token_per_input,
        "hessian_hidden_exact (HEART-ViT)": analyze(a, [(xs, ys)], targets=("tokens",), holdout=0, exact=True,
                                                     token_mode="hidden").token_per_input,
    }
    for m in ("cls_attention", "magnitude", "fisher", "random"):
        preds[m] = analyze(a, [(xs, ys)], targets=("tokens",), method=m).token_per_input
    res["tokens_single"] = {k: float(np.nanmean(spearman(v[:, :L - 1, P:], m_tok))) for k, v in preds.items()}
    print("tokens single", res["tokens_single"], flush=True)

    # ---------------------------------------------------------------- token groups (keep curves)
    sens = analyze(a, calib, targets=("tokens",), holdout=0.25, **kw)
    res["scorer_quality_calib_holdout"] = sens.scorer_quality
    groups = {}
    xg = xt[:64]
    with torch.no_grad():
        boxes = []
        import contextlib
        with contextlib.ExitStack() as st:
            boxes = [st.enter_context(a.attention_probs(l)) for l in range(L)]
            hid = []
            hooks = [a.block_module(l).register_forward_hook(lambda m, i, o: hid.append(o.detach())) for l in range(L)]
            a.forward(xg)
            for h in hooks:
                h.remove()
    # held-out predictions for the same inputs, to compare measured against the exact curve definition
    sens_g = analyze(a, [xg], targets=("tokens",), holdout=0, **kw)
    for scorer in ("cls_attention", "linear"):
        pred_c, meas_c, pred_h, pred_g = [], [], [], []
        for l in range(L - 1):
            sc = cls_attention_scores(boxes[l].value, P) if scorer == "cls_attention" else \
                linear_scores(hid[l], *sens.scorers[l], P)
            order = drop_order(sc, P)  # (B, N-P) lowest first
            for K in range(N - 1, P, -2):
                drop = torch.as_tensor(order[:, :N - K])
                meas_c.append(float(measure.token_drop_losses(a, xg, l, drop).mean()))
                pred_c.append(float(sens.token_keep_curves[scorer][l, K]))  # from calibration inputs
                pred_g.append(float(sens.token_keep_curves.get(scorer + "_group", sens.token_keep_curves[scorer])[l, K]))
                pred_h.append(float(np.take_along_axis(sens_g.token_per_input[:, l], order[:, :N - K], 1).sum(1).mean()))
        pred_c, meas_c, pred_h, pred_g = map(np.array, (pred_c, meas_c, pred_h, pred_g))
        groups[scorer] = {"spearman_calib_curve_vs_measured": float(spearman(pred_c, meas_c)),
                          "median_ratio_measured_over_calib_curve": float(np.median(meas_c / np.maximum(pred_c, 1e-12))),
                          "spearman_group_quadratic_calib_vs_measured": float(spearman(pred_g, meas_c)),
                          "median_ratio_measured_over_group_quadratic": float(np.median(meas_c / np.maximum(pred_g, 1e-12))),
                          "spearman_diag_sum_same_inputs_vs_measured": float(spearman(pred_h, meas_c)),
                          "median_ratio_measured_over_diag_sum": float(np.median(meas_c / np.maximum(pred_h, 1e-12))),
                          "points": [[float(p), float(q)] for p, q in zip(pred_c, meas_c)]}
        print("groups", scorer, {k: v for k, v in groups[scorer].items() if k != "points"}, flush=True)
    res["token_groups"] = groups
    res["time_s"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
