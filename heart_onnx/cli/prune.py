"""``heart-onnx prune MODEL.onnx PLAN.json -o OUT.onnx``: apply a plan by ONNX graph surgery."""
from __future__ import annotations

import argparse
import time

from .common import add_json_flag, add_onnx_input, add_output_flag, emit_json, new_parser


def register(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, "prune", "apply a plan (heads, tokens, weight merges) to an ONNX model by graph surgery", (
        "heart-onnx prune model.onnx plan.json -o model.pruned.onnx",
        "heart-onnx prune model.onnx plan.json -o model.trt.onnx --int32-indices   # TensorRT 8.x",
    ))
    add_onnx_input(p, help="the dense ONNX export (heart_onnx.export; external data beside it is read)")
    p.add_argument("plan", metavar="PLAN.json", help="plan JSON from 'heart-onnx plan' (its .pairs.npz beside it)")
    add_output_flag(p, "the pruned ONNX model")
    p.add_argument("--int32-indices", action="store_true", help="INT32 token indices (TensorRT 8.x); default INT64")
    p.add_argument("--no-check", action="store_true", help="skip the TensorRT-rule check and the ONNX Runtime smoke run")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..plan import Plan
    from ..surgery.api import prune

    plan = Plan.load(args.plan)
    t0 = time.perf_counter()
    out = prune(args.model, plan, args.output, int32_indices=args.int32_indices, check=not args.no_check)
    dt = time.perf_counter() - t0
    summary = {"output": str(out), "seconds": round(dt, 3), "heads_removed": sum(len(v) for v in plan.heads.values()),
               "token_stages": [{"after_layer": t.after_layer, "keep": t.keep} for t in plan.tokens],
               "merges": len(plan.merges), "int32_indices": bool(args.int32_indices)}
    if args.json:
        emit_json(summary)
    else:
        print(f"wrote {out} in {dt:.2f} s ({summary['heads_removed']} heads removed, "
              f"{len(plan.tokens)} token stages, {len(plan.merges)} weight merges)")
    return 0
