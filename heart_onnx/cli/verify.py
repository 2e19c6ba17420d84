"""``heart-onnx verify PRUNED.onnx --model NAME|--weights PATH --plan PLAN.json``: check the invariant."""
from __future__ import annotations

import argparse

from ..errors import HeartError
from .common import (add_json_flag, add_model_flags, add_onnx_input, add_plan_flag, emit_json, int_list, load_model_from_args,
                     new_parser)


def register(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, "verify", "compare a pruned ONNX model with the PyTorch model masked by the same plan", (
        "heart-onnx verify model.pruned.onnx --model tiny_vit --weights tiny_vit.pt --plan plan.json",
        "heart-onnx verify demo_vit.pruned.onnx --model demo-vit --plan plan.json --batch-sizes 1,16",
        "heart-onnx verify model.pruned.onnx --weights model.pt --plan plan.json --json",
    ))
    add_onnx_input(p, dest="onnx", help="the pruned ONNX model")
    add_model_flags(p, module_pickle=True)
    add_plan_flag(p, help="the plan JSON the model was pruned with")
    p.add_argument("-n", type=int, default=4, help="random batches per batch size (default 4)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--rtol", type=float, default=1e-4, help="tolerance as a fraction of the output scale (default 1e-4)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..plan import Plan
    from ..verify import verify

    plan = Plan.load(args.plan)
    model = load_model_from_args(args, module_pickle=True)
    sizes = tuple(int_list(args.batch_sizes, "--batch-sizes") or ())
    if not sizes or min(sizes) < 1:
        raise HeartError(f"--batch-sizes must be positive integers separated by commas, got {args.batch_sizes!r}")
    res = verify(args.onnx, model, plan, n=args.n, batch_sizes=sizes, rtol_scale=args.rtol)
    if args.json:
        emit_json(res.to_dict())
    else:
        print(res)
    return 0 if res else 1
