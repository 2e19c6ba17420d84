"""Planner speed: the whole Pareto curve for ViT-B/16 (12x12 heads, 197 tokens), and the FLOPs model check.

Protocol: synthetic sensitivities with analyze's layout (``head`` (12, 12) gamma-distributed scores,
``token_keep_curve`` (12, 198) cumulative sums of sorted gamma token scores), ViT-B/16 geometry. One
warm-up call, then ``--repeats`` timed calls of each operation (``time.perf_counter``, one process, the
current OMP/MKL thread settings); median and p90 reported. Operations:

- ``pareto_heads_tokens``: ``pareto(sens)`` with heads and tokens, default token layers (3, 6, 9);
- ``pareto_linear_fused``: the same with the linear scorer and fused tokens;
- ``to_plan``: picking one budget's plan from a computed curve (what a notebook slider does);
- ``plan_end_to_end``: ``plan(sens, 0.05)`` (curve + plan);
- ``pareto_with_pairs`` (``--pairs``): heads, tokens and channel merges of the 12 fc1->fc2 pairs
  (setup dominated by ``pairing.merge_curve`` on 3072x768 weights).

``--check-flops`` also exports ViT-B/16 (timm, random init, TorchScript exporter, batch 1) and compares
the MatMul/Gemm/Conv MACs of the graph (onnx shape inference; ``heart_onnx.graph_flops`` too when it is
installed) with ``heart_onnx.flops.model_flops``: the brief asks for agreement within 2%.

    OMP_NUM_THREADS=1 python benchmarks/planner_speed.py --out artifacts/planner_speed.json [--check-flops] [--pairs]

Whether the planner's predictions hold on held-out data is ``benchmarks/budget_accuracy.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GEO = dict(family="vit", layers=12, heads=12, head_dim=64, hidden=768, seq_len=197, prefix_tokens=1, patch_size=16,
           in_chans=3, num_classes=1000, mlp_hidden=3072)


def synth_sens(pairs: bool = False, seed: int = 0):
    from heart_onnx.sensitivities import Sensitivities

    rng = np.random.default_rng(seed)
    L, H, N, P, D = 12, 12, 197, 1, 768
    curve = np.full((L, N + 1), np.nan)
    for l in range(L):
        cum = np.concatenate([[0.0], np.cumsum(np.sort(rng.gamma(0.5, 0.004 * (1 + l / L), N - P)))])
        curve[l, P:] = cum[N - np.arange(P, N + 1)]
    s = Sensitivities(meta={"family": "vit", "fingerprint": "bench", "geometry": dict(GEO)},
                      head=rng.gamma(0.5, 0.01, (L, H)), token_keep_curve=curve)
    s.token_keep_curves = {"cls_attention": curve, "linear": curve * 1.1}
    s.scorers = {l: (rng.standard_normal(D).astype(np.float32), 0.0) for l in range(L)}
    if pairs:
        from heart_onnx.pairing import pack

        ent = {}
        for l in range(L):
            n1, n2 = f"blocks.{l}.mlp.fc1.weight", f"blocks.{l}.mlp.fc2.weight"
            ent[n1] = {"name": np.array(n1), "sha": np.array("a"), "shape": np.array([3072, D]),
                       "weight": rng.standard_normal((3072, D)).astype(np.float32),
                       "hdiag": rng.gamma(1.0, 1e-6, (3072, D)).astype(np.float32), "curvature": np.array(1.0),
                       "consumer": np.array(n2), "consumer_sha": np.array("b"), "consumer_shape": np.array([D, 3072]),
                       "consumer_weight": rng.standard_normal((D, 3072)).astype(np.float32),
                       "consumer_hdiag": rng.gamma(1.0, 1e-6, (D, 3072)).astype(np.float32),
                       "consumer_curvature": np.array(1.0)}
        s.pairs = pack(ent)
    return s


def timeit(fn, repeats: int) -> dict:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts = np.asarray(ts) * 1e3
    return {"median_ms": float(np.median(ts)), "p90_ms": float(np.percentile(ts, 90)), "min_ms": float(ts.min()),
            "repeats": repeats}


def graph_macs_shape_inference(path: str) -> int:
    """MatMul/Gemm/Conv MACs with onnx shape inference (unknown dims, i.e. the batch, taken as 1)."""
    import onnx
    from onnx import shape_inference

    m = shape_inference.infer_shapes(onnx.load(path))
    shapes = {i.name: list(i.dims) for i in m.graph.initializer}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                           for d in vi.type.tensor_type.shape.dim]
    total = 0
    for n in m.graph.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        a, b, o = shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]
        if n.op_type == "Conv":
            total += int(np.prod(o)) * int(np.prod(b[1:]))
        elif n.op_type == "Gemm" and any(at.name == "transA" and at.i for at in n.attribute):
            total += int(np.prod(o)) * a[0]
        else:
            total += int(np.prod(o)) * a[-1]
    return total


def check_flops() -> dict:
    import warnings

    import torch
    from timm.models.vision_transformer import VisionTransformer

    from heart_onnx.flops import model_flops

    torch.manual_seed(0)
    m = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, weight_init="skip").eval()
    out: dict = {"model": "timm VisionTransformer ViT-B/16 224x224, random init, TorchScript export opset 17, batch 1"}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vit_b16.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (torch.randn(1, 3, 224, 224),), path, dynamo=False, opset_version=17,
                              input_names=["pixel_values"])
        analytic = model_flops(GEO).macs_dense
        graph = graph_macs_shape_inference(path)
        out.update(analytic_macs=analytic, graph_macs_shape_inference=graph, rel_diff=(analytic - graph) / graph)
        try:
            import onnx

            from heart_onnx.graph_flops import graph_flops

            macs = float(graph_flops(onnx.load(path)).macs)
            out.update(graph_flops_macs=macs, rel_diff_graph_flops=(analytic - macs) / macs)
        except ImportError:
            out["graph_flops"] = "heart_onnx.graph_flops not installed"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="artifacts/planner_speed.json")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--pairs", action="store_true", help="also time a curve with channel merges of the 12 MLPs")
    ap.add_argument("--check-flops", action="store_true", help="export ViT-B/16 and compare graph MACs with the model")
    args = ap.parse_args(argv)

    from heart_onnx.budget import pareto, plan

    sens = synth_sens()
    curve = pareto(sens)
    res: dict = {
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "device": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                   "python": sys.version.split()[0], "numpy": np.__version__,
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "geometry": GEO, "curve_points": len(curve),
        "timings": {
            "pareto_heads_tokens": timeit(lambda: pareto(sens), args.repeats),
            "pareto_linear_fused": timeit(lambda: pareto(sens, scorer="linear", fuse_dropped=True), args.repeats),
            "to_plan": timeit(lambda: curve.to_plan(0.05), args.repeats),
            "plan_end_to_end": timeit(lambda: plan(sens, 0.05), args.repeats),
        },
        "plan_0.05": {k: v for k, v in plan(sens, 0.05).to_dict().items() if k in ("predicted_loss_change", "flops_dense", "flops_pruned", "tokens", "notes")},
    }
    if args.pairs:
        sp = synth_sens(pairs=True)
        t = time.perf_counter()
        c = pareto(sp, granularity="channel")
        res["timings"]["pareto_with_pairs_once_ms"] = (time.perf_counter() - t) * 1e3
        res["curve_points_with_pairs"] = len(c)
    if args.check_flops:
        res["flops_check"] = check_flops()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    for k, v in res["timings"].items():
        print(f"{k:28s} {v if isinstance(v, float) else v['median_ms']:.2f} ms" + ("" if isinstance(v, float) else f" (p90 {v['p90_ms']:.2f})"))
    if "flops_check" in res:
        fc = res["flops_check"]
        print(f"ViT-B/16 MACs analytic {fc['analytic_macs']:.6g} graph {fc['graph_macs_shape_inference']:.6g} "
              f"({100 * fc['rel_diff']:+.3f}%)" + (f"; graph_flops {fc['graph_flops_macs']:.6g} "
              f"({100 * fc['rel_diff_graph_flops']:+.3f}%)" if "graph_flops_macs" in fc else ""))
    for model in ("scale", "power"):
        for r in res.get("demo_calibration", {}).get(model, {}).get("held_out", []):
            print(f"demo {model:5s} {r['targets']:12s} budget {r['budget']:<5} predicted {r['predicted']:.4f} "
                  f"measured {r['measured']:.4f} reduction {100 * r['flops_reduction']:.1f}%")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
