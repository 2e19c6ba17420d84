"""Does a single-head ranking transfer between image sets? (demo ViT, digits)

Protocol: the shipped demo ViT; measured loss of removing each single head = mean KL(dense || head removed)
over an image set (``sensitivity.measure.single_head_losses``), on the 300 val images and on the 450 test
images; predicted = ``analyze(..., targets=("heads",))`` (default estimator) on val, on test, and on 300
training images, and each baseline (``method=`` magnitude, taylor, fisher, random; Taylor and Fisher use
the images' labels) on val and on test. Reported: Spearman over the 32 heads between every prediction and both measurements,
and between the two measurements themselves (how stable the ground-truth ranking is across image sets,
an upper bound for any prediction made on other images).

    OMP_NUM_THREADS=1 python benchmarks/head_rank_transfer.py --out artifacts/head_rank_transfer.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="artifacts/head_rank_transfer.json")
    args = ap.parse_args(argv)
    import torch
    from scipy.stats import spearmanr

    from heart_onnx.models.demo import demo_vit, digits_split, digits_val
    from heart_onnx.models.registry import adapt
    from heart_onnx.sensitivity.api import analyze
    from heart_onnx.sensitivity.measure import single_head_losses

    t0 = time.time()
    model = demo_vit().eval()
    adapter = adapt(model)
    x_train, y_train, x_test, y_test = digits_split()
    x_val, y_val = digits_val()
    sets = {"val": (x_val, y_val), "test": (x_test, y_test), "train300": (x_train[:300], y_train[:300])}

    def measured(x):  # (N, L, H) per-input losses -> (L*H,) mean
        return np.asarray(single_head_losses(adapter, x)).reshape(len(x), -1).mean(0)

    meas = {"val": measured(x_val), "test": measured(x_test)}
    out = {"protocol": __doc__.split("\n\n")[1], "spearman_measured_val_vs_test": float(spearmanr(meas["val"], meas["test"])[0]),
           "predicted_on": {}}
    for method in ("hessian", "magnitude", "taylor", "fisher", "random"):
        for name, (x, y) in sets.items():
            if method != "hessian" and name == "train300":
                continue
            batches = [(x[i:i + 50], y[i:i + 50] if method in ("taylor", "fisher") else None) for i in range(0, len(x), 50)]
            pred = np.asarray(analyze(model, batches, targets=("heads",), method=method).head).ravel()
            key = name if method == "hessian" else f"{method}:{name}"
            out["predicted_on"][key] = {f"spearman_vs_measured_{m}": float(spearmanr(pred, v)[0]) for m, v in meas.items()}
            print(key, out["predicted_on"][key])
    out["seconds"] = time.time() - t0
    print("measured val vs measured test", out["spearman_measured_val_vs_test"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
