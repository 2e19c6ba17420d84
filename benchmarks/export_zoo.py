"""Export full-size zoo models with both exporters and check them in ONNX Runtime.

Protocol: for each model (random init, published geometry, eval mode, float32, CPU) and exporter,
time ``heart_onnx.models.export.export`` once (wall clock, includes tracing, optimisation and the atomic
write; the first dynamo export in a process also pays for imports), record the file size(s), the node
count by op type, then run ONNX Runtime (CPUExecutionProvider) at batch 1 and batch 2 on fresh random
inputs (text models: ``--seq`` tokens) and record the max abs difference against PyTorch and the output
scale (max abs of the PyTorch output). Versions of torch, onnx, onnxruntime and the thread count are
recorded. Nothing is compared across runs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_zoo.py --models pythia-70m resnet56 --out artifacts/export_zoo.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_MODELS = ["vit_b_16", "deit_b_16", "pythia-70m", "resnet18", "resnet56", "mobilenetv2"]


def run_one(name: str, exporter: str, seq: int, workdir: Path) -> dict:
    import onnx
    import onnxruntime as ort

    from heart_onnx.models import export as ex
    from heart_onnx.models import registry, zoo

    torch.manual_seed(0)
    model = zoo.build(name)
    a = registry.adapt(model)
    path = workdir / f"{name}.{exporter}.onnx"
    rec: dict = {"model": name, "exporter": exporter, "params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    try:
        ex.export(model, a.example_inputs(1, seq), path, exporter=exporter)
    except Exception as exc:  # record and go on: a benchmark reports, it does not stop
        rec["error"] = f"{type(exc).__name__}: {exc}"
        return rec
    rec["export_s"] = round(time.perf_counter() - t0, 2)
    rec["bytes"] = {p.name: p.stat().st_size for p in workdir.iterdir() if p.name.startswith(path.name)}
    m = onnx.load(str(path), load_external_data=False)
    rec["ops"] = dict(collections.Counter(n.op_type for n in m.graph.node).most_common())
    rec["opset"] = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rec["inputs"] = [(i.name, i.shape) for i in sess.get_inputs()]
    rec["outputs"] = [(o.name, o.shape) for o in sess.get_outputs()]
    rec["check"] = []
    for batch in (1, 2):
        x = a.example_inputs(batch, seq)
        with torch.no_grad():
            ref = a.forward(x).numpy()
        feed = {k: v.numpy() for k, v in x.items()} if isinstance(x, dict) else {"pixel_values": x.numpy()}
        out = sess.run(None, feed)[0]
        rec["check"].append({"batch": batch, "max_abs_diff": float(np.abs(out - ref).max()),
                             "output_scale": float(np.abs(ref).max())})
    for p in workdir.iterdir():
        if p.name.startswith(path.name):
            p.unlink()
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--exporters", nargs="+", default=["torchscript", "dynamo"])
    ap.add_argument("--seq", type=int, default=128, help="tokens for text models (default 128)")
    ap.add_argument("--out", default="artifacts/export_zoo.json")
    args = ap.parse_args(argv)
    import onnx
    import onnxruntime

    results = {
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "machine": platform.machine(), "seq": args.seq, "runs": [],
    }
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            for exporter in args.exporters:
                rec = run_one(name, exporter, args.seq, Path(d))
                results["runs"].append(rec)
                brief = {k: rec.get(k) for k in ("model", "exporter", "export_s", "error")}
                brief["check"] = rec.get("check")
                print(json.dumps(brief), file=sys.stderr)
    out = Path(args.out)
    from heart_onnx.fileio import write_text_atomic

    write_text_atomic(out, json.dumps(results, indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
