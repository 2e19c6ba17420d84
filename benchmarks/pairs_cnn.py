"""Pair merging vs pruning baselines on the demo CNN (digits): held-out accuracy at fixed sparsity.

Protocol
--------
- Model: ``heart_onnx.models.demo.demo_cnn()`` (shipped weights), eval mode, CPU, float32.
- Data: scikit-learn digits, the fixed ``DEMO_SPLIT``: sensitivities on the 300 val images
  (``digits_calibration()``, never trained on; batches of ``--batch``), accuracy and KL(dense || merged)
  on the 450 held-out test images. No fine-tuning after merging (one-shot).
- Sensitivities: ``weight_sensitivities`` with the label-free KL loss, ``--probes`` Hutchinson probes
  per batch, ``--power-iters`` power iterations per layer, input Gram matrices.
- Weights merged: every Conv/Linear the adapter lists that supports the granularity (2:4 needs input
  channels % 4 == 0, so the 1-channel stem is left dense there), each at the same sparsity.
  Channel mode: the conv1 -> conv2 pairs inside the residual blocks. Every setting is run twice:
  ``layers="all"`` and ``"all-but-stem"`` (the 1-channel stem conv, 144 weights, left dense, as
  pruning papers usually keep the first layer).
- Methods (one interface, ``heart_onnx.pairing.make_merge``): ``camp`` (significance 1/2 h w^2,
  the most correlated kept partner, K-FAC least-squares coefficient; the default), ``camp-cyclic``
  (the same with the paper's cyclic partners),
  ``half`` (the paper's rule: cyclic partner gets w_p / 2), ``hessian`` (OBD zeroing), ``magnitude``.
- Reported per (granularity, sparsity, method): test accuracy, mean KL to the dense model on the test
  split, the predicted loss change (sum over layers of ``predicted_loss``) and the fraction of
  parameters merged away.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/pairs_cnn.py [-o artifacts/pairs_cnn.json]``
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from heart_onnx import pairing
from heart_onnx.models.demo import DEMO_SPLIT, demo_cnn, digits_calibration, digits_split
from heart_onnx.models.merge_weights import merged
from heart_onnx.sensitivity.pairs import weight_sensitivities

METHODS = (("camp", "best"), ("camp", "cyclic"), ("half", "cyclic"), ("hessian", "cyclic"), ("magnitude", "cyclic"))
SCOPES = (("all", ()), ("all-but-stem", ("conv1.weight",)))  # the stem conv: 1 input channel, 9 weights per filter
SETTINGS = (("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5), ("channel", 0.25), ("channel", 0.5))


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dense_logits: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    acc = float((logits.argmax(-1) == y).float().mean())
    p_log = F.log_softmax(dense_logits, -1)
    kl = float((p_log.exp() * (p_log - F.log_softmax(logits, -1))).sum(-1).mean())
    return acc, kl


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default="artifacts/pairs_cnn.json", help="JSON output (default %(default)s)")
    ap.add_argument("--probes", type=int, default=32, help="Hutchinson probes per batch (default %(default)s)")
    ap.add_argument("--power-iters", type=int, default=20, help="power iterations per layer (default %(default)s)")
    ap.add_argument("--batch", type=int, default=64, help="calibration batch size (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default=None, help="demo CNN state dict (default: the shipped weights)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    model = (demo_cnn(weights=args.weights) if args.weights else demo_cnn()).eval()
    _, _, x_te, y_te = digits_split()
    xc, _ = digits_calibration()
    calib = [xc[i:i + args.batch] for i in range(0, len(xc), args.batch)]
    with torch.no_grad():
        dense_logits = model(x_te)
    dense_acc = float((dense_logits.argmax(-1) == y_te).float().mean())

    t0 = time.perf_counter()
    sens = weight_sensitivities(model, calib, probes=args.probes, power_iters=args.power_iters, seed=args.seed)
    t_sens = time.perf_counter() - t0
    total_params = sum(int(np.prod(e["shape"])) for e in sens.values())

    rows = []
    for (scope, skip), (gran, sp), (method, pairing_kind) in itertools.product(SCOPES, SETTINGS, METHODS):
        t1 = time.perf_counter()
        merges, pred, removed = [], 0.0, 0
        for name, e in sens.items():
            if not pairing.supports(e, gran) or name in skip:
                continue
            m = pairing.make_merge(e, gran, sp, method, pairing_kind)
            merges.append(m)
            pred += pairing.predicted_loss(e, m)
            if gran == "channel":
                k = len(m.pruned)
                removed += k * (int(np.prod(m.shape[1:])) + int(m.consumer_shape[0]) * int(np.prod(m.consumer_shape[2:])))
            else:
                removed += len(m.pruned)
        acc, kl = evaluate(merged(model, merges), x_te, y_te, dense_logits)
        rows.append({
            "layers": scope, "granularity": gran, "sparsity": sp, "method": method if (pairing_kind == "best") == (method == "camp") else f"{method}-{pairing_kind}",
            "accuracy": acc, "kl_test": kl, "predicted_loss": pred, "n_weights": len(merges),
            "params_removed_fraction": removed / total_params, "seconds": time.perf_counter() - t1,
        })
        r = rows[-1]
        print(f"{scope:13s} {gran:12s} {sp:4.2f} {r['method']:10s} acc {acc:.4f}  kl {kl:.4f}  pred {pred:.4f}  "
              f"removed {r['params_removed_fraction']:.3f}", flush=True)

    out = {
        "benchmark": "pairs_cnn", "model": f"demo_cnn ({args.weights or 'shipped weights'})", "data": DEMO_SPLIT,
        "n_test": int(len(y_te)), "n_calib": int(len(xc)), "dense_accuracy": dense_acc,
        "sensitivity": {"loss": "kl", "probes_per_batch": args.probes, "batches": len(calib),
                        "power_iters": args.power_iters, "seconds": t_sens},
        "prunable_params": total_params, "results": rows,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
                     "platform": platform.platform()},
        "device": "cpu", "threads": torch.get_num_threads(),
    }
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"dense accuracy {dense_acc:.4f}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
