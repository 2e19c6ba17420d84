"""Hutch++ vs plain Hutchinson: relative error of tr(H) at a fixed HVP budget against torch.func.hessian.

Protocol: the test problems of ``tests/test_hvp.py`` (imported from there, so the benchmark and the test
measure the same Hessians): the small MLP with labelled cross-entropy at a random point (indefinite;
problem seeds 0..5), and the Gauss-Newton Hessian of the KL loss at the dense point of an MLP and of a tiny
2-head attention model (problem seeds 0..2). For each problem: exact trace from ``torch.func.hessian``;
``--probes`` HVPs (default 100) per estimate, probe seeds 0..``--seeds``-1, float64 and float32 parameters;
relative error |estimate - tr| / |tr|, mean and max over seeds. Also per problem: plain Hutchinson's
theoretical relative standard deviation sqrt(2 (||H||_F^2 - sum H_ii^2) / m) / |tr|, the diagonal's share of
||H||_F^2 and sum|lambda| / |tr| (trace cancellation: relative accuracy is out of reach when it is large).

    OMP_NUM_THREADS=1 python benchmarks/hutchpp_accuracy.py --out artifacts/hutchpp_accuracy.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from heart_onnx.sensitivity.hvp import hutchinson_trace  # noqa: E402
from test_hvp import _kl_problem, _problem  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="artifacts/hutchpp_accuracy.json")
    ap.add_argument("--probes", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for dtype in (torch.float64, torch.float32):
        problems = [("mlp_ce", s) + tuple(_problem(dtype, s)[:3]) for s in range(6)]
        problems += [(net + "_kl", s) + _kl_problem(net, s, dtype) for net in ("mlp", "attention") for s in range(3)]
        for name, seed, f, params, H in problems:
            H = H.double()
            ev = torch.linalg.eigvalsh(H)
            tr = float(H.trace())
            off2 = float((H ** 2).sum() - (H.diagonal() ** 2).sum())
            row = {"problem": name, "seed": seed, "dtype": str(dtype).replace("torch.", ""), "dim": H.shape[0],
                   "plain_theory_rel_sd": (2 * off2 / args.probes) ** 0.5 / abs(tr),
                   "diag_share": float((H.diagonal() ** 2).sum() / (H ** 2).sum()),
                   "nuclear_over_trace": float(ev.abs().sum()) / abs(tr)}
            for method in ("hutch++", "hutchinson"):
                e = [abs(hutchinson_trace(lambda: f(*params), params, args.probes, seed=s, method=method) - tr) / abs(tr)
                     for s in range(args.seeds)]
                row[method] = {"mean": float(np.mean(e)), "max": float(np.max(e))}
            rows.append(row)
            print(f"{name:8s} seed {seed} {row['dtype']:7s} d {row['dim']:3d} plain sd {row['plain_theory_rel_sd']:.3f} "
                  f"|lambda|/tr {row['nuclear_over_trace']:5.1f}  hutch++ mean {row['hutch++']['mean']:.4f} max "
                  f"{row['hutch++']['max']:.4f}  hutchinson mean {row['hutchinson']['mean']:.4f} max {row['hutchinson']['max']:.4f}")
    summary = {}
    for name in ("mlp_ce", "mlp_kl", "attention_kl"):
        for method in ("hutch++", "hutchinson"):
            sel = [r[method]["mean"] for r in rows if r["problem"] == name and r["nuclear_over_trace"] < 8]
            summary[f"{name}/{method}"] = float(np.mean(sel))
    print("mean relative error over seeds, problems with sum|lambda| < 8 |tr|:")
    for k, v in summary.items():
        print(f"  {k:26s} {v:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"protocol": __doc__.split("\n\n")[1], "probes": args.probes, "seeds": args.seeds,
                                          "rows": rows, "summary": summary}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
