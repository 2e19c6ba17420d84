"""``heart-onnx verify PRUNED.onnx --model NAME|--weights PATH --plan PLAN.json``: check the invariant."""
from __future__ import annotations

import argparse

from ..errors import HeartError
from .common import add_json_flag, emit_json, new_parser


def register(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, "verify", "compare a pruned ONNX model with the PyTorch model masked by the same plan", (
        "heart-onnx verify model.pruned.onnx --model tiny_vit --weights tiny_vit.pt --plan plan.json",
        "heart-onnx verify model.pruned.onnx --weights model.pt --plan plan.json --json",
    ))
    p.add_argument("onnx", help="the pruned ONNX model")
    p.add_argument("--model", help="zoo model name (see heart_onnx.models.zoo.names()); with --weights: its state dict")
    p.add_argument("--weights", help="a saved model (torch.save of the nn.Module) or, with --model, a state dict")
    p.add_argument("--plan", required=True, help="the plan JSON the model was pruned with")
    p.add_argument("-n", type=int, default=4, help="random batches per batch size (default 4)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--rtol", type=float, default=1e-4, help="tolerance as a fraction of the output scale (default 1e-4)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _load_model(args: argparse.Namespace):
    import torch

    if not args.model and not args.weights:
        raise HeartError("give --model NAME (a zoo model) and/or --weights PATH")
    if args.model:
        from ..models import zoo

        model = zoo.build(args.model)
        if args.weights:
            try:
                state = torch.load(args.weights, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001
                raise HeartError(f"cannot read weights {args.weights} ({type(exc).__name__}): give a state dict file") from None
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise HeartError(f"weights {args.weights} do not fit model {args.model}: {str(exc).splitlines()[0]}") from None
        return model.eval()
    try:
        model = torch.load(args.weights, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise HeartError(f"cannot read model {args.weights} ({type(exc).__name__}): save it with torch.save(model)") from None
    if not isinstance(model, torch.nn.Module):
        raise HeartError(f"{args.weights} holds a {type(model).__name__}, not a model: add --model NAME for a state dict")
    return model.eval()


def run(args: argparse.Namespace) -> int:
    from ..plan import Plan
    from ..verify import verify

    plan = Plan.load(args.plan)
    model = _load_model(args)
    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError:
        raise HeartError(f"--batch-sizes must be integers separated by commas, got {args.batch_sizes!r}") from None
    res = verify(args.onnx, model, plan, n=args.n, batch_sizes=sizes, rtol_scale=args.rtol)
    if args.json:
        emit_json(res.to_dict())
    else:
        print(res)
    return 0 if res else 1
