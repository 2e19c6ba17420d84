"""Surgery speed benchmark: ViT-B/16 (random init) on ONNX Runtime CPU, pruned vs dense, in one run.

Protocol: timm ViT-B/16 at 224px, random weights, dynamo export (opset 18). Plans: tokens only
(30% / 50% of the patch tokens dropped after layer 3), heads only (25% / 50% of the heads of every
layer, lowest indices), both (50% heads + 30% tokens). For each: ONNX Runtime CPUExecutionProvider,
``intra_op_num_threads`` = ``--threads`` (default 1), graph optimisations ORT_ENABLE_ALL, fp32;
``--warmup`` (default 2) runs, then ``--repeats`` (default 5) timed runs per batch size, median and
p90 of wall time; the dense graph is re-timed right before each pruned graph. Reported: latency ratio dense/pruned next to the FLOPs ratio
(``heart_onnx.flops.model_flops``), their quotient ("efficiency", target >= 0.9); selection overhead:
the same token plan with TopK/GatherElements replaced by a static ``Slice`` of the first tokens
(target <= 3% of pruned latency); surgery wall time and peak Python memory (tracemalloc) of
``prune`` for heads+tokens on ViT-B/16 (targets <= 15 s, <= 3x model size).

    OMP_NUM_THREADS=1 python benchmarks/surgery_speed.py --out artifacts/surgery_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _time(sess, batch: int, warmup: int, repeats: int) -> dict:
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x})
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "p90_s": float(np.percentile(ts, 90)), "runs": repeats}


def _static_slice(src: Path, dst: Path) -> None:
    """Replace every token selection (GatherElements on tokens) by a static Slice of the first K tokens."""
    import onnx
    import onnx_graphsurgeon as gs

    g = gs.import_onnx(onnx.load(str(src)))
    for n in list(g.nodes):
        if n.op == "GatherElements" and n.name.startswith("heart_tokens"):
            k = None
            e = n.inputs[1].inputs[0]  # Expand(Unsqueeze(idx))
            topk = e.inputs[0].inputs[0].inputs[0].inputs[0]
            if topk.op == "TopK":
                k = int(np.asarray(topk.inputs[1].values).reshape(-1)[0])
            if k is None:
                continue
            n.op = "Slice"
            n.attrs = {}
            n.inputs = [n.inputs[0], gs.Constant(n.name + "_s", np.array([0], np.int64)),
                        gs.Constant(n.name + "_e", np.array([k], np.int64)), gs.Constant(n.name + "_a", np.array([1], np.int64))]
    g.cleanup().toposort()
    onnx.save(gs.export_onnx(g), str(dst))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts/surgery_speed.json")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    import onnxruntime
    import torch

    from heart_onnx.flops import model_flops
    from heart_onnx.models import zoo
    from heart_onnx.models.export import export
    from heart_onnx.models.fingerprint import fingerprint
    from heart_onnx.models.registry import adapt
    from heart_onnx.plan import Plan, TokenStage
    from heart_onnx.surgery.api import prune

    torch.manual_seed(0)
    model = zoo.vit_b_16()
    a = adapt(model)
    H, N, L = a.num_heads, a.seq_len, a.num_layers
    work = Path(tempfile.mkdtemp(prefix="heart_bench_"))
    dense = work / "dense.onnx"
    export(model, a.example_inputs(1), dense)
    fp, geo = fingerprint(model), a.geometry()

    def plan(frac_heads: float = 0.0, frac_tokens: float = 0.0) -> Plan:
        nh = int(round(H * frac_heads))
        heads = {l: tuple(range(nh)) for l in range(L)} if nh else {}
        toks = (TokenStage(3, N - int(round((N - 1) * frac_tokens))),) if frac_tokens else ()
        return Plan(fingerprint=fp, family="vit", geometry=geo, heads=heads, tokens=toks, prefix_tokens=1)

    plans = {"tokens_30": plan(0, 0.3), "tokens_50": plan(0, 0.5), "heads_25": plan(0.25), "heads_50": plan(0.5),
             "heads_50_tokens_30": plan(0.5, 0.3)}
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    dense_sess = _session(dense, args.threads)
    results = {}
    for name, p in plans.items():
        out = work / f"{name}.onnx"
        tracemalloc.start()
        t0 = time.perf_counter()
        prune(dense, p, out)
        surgery_s = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        fl = model_flops(geo, p)
        sess = _session(out, args.threads)
        r = {"surgery_s": surgery_s, "surgery_peak_python_bytes": peak, "flops_dense": fl.dense, "flops_pruned": fl.pruned,
             "flops_ratio": fl.dense / fl.pruned, "batches": {}}
        static = None
        if p.tokens:
            st = work / f"{name}_static.onnx"
            _static_slice(out, st)
            static = _session(st, args.threads)
        for b in sizes:  # dense re-timed next to every pruned graph: the 2 shared cores drift over minutes
            td = _time(dense_sess, b, args.warmup, args.repeats)
            t = _time(sess, b, args.warmup, args.repeats)
            row = {"pruned": t, "dense": td, "latency_ratio": td["median_s"] / t["median_s"]}
            row["efficiency"] = row["latency_ratio"] / r["flops_ratio"]
            if static is not None:
                ts = _time(static, b, args.warmup, args.repeats)
                row["static_slice"] = ts
                row["selection_overhead_frac"] = (t["median_s"] - ts["median_s"]) / t["median_s"]
            r["batches"][str(b)] = row
        results[name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "batches"}), file=sys.stderr)
        for b, row in r["batches"].items():
            print(f"  batch {b}: latency x{row['latency_ratio']:.2f} flops x{r['flops_ratio']:.2f} "
                  f"eff {row['efficiency']:.2f} overhead {row.get('selection_overhead_frac', float('nan')):.3f}", file=sys.stderr)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    report = {
        "protocol": __doc__.strip().splitlines()[0], "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "provider": "CPUExecutionProvider", "threads": args.threads, "precision": "fp32",
        "warmup": args.warmup, "repeats": args.repeats, "model": "timm vit_b_16 (random init), dynamo export",
        "model_bytes": model_bytes, "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
