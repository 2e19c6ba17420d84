"""``heart-onnx finetune``: short fine-tuning under a plan (structure kept), accuracy before and after.

The model is trained through the plan's masking hooks (``heart_onnx.finetune``), so removed heads stay
removed and tokens are dropped by the same run-time rule. Writes the fine-tuned weights as a plain
state dict (``torch.load(path, weights_only=True)`` reads it), the plan re-bound to the new weights
(``<output stem>.plan.json``: prune the fine-tuned export with this one), and with ``--export`` the
pruned ONNX of the fine-tuned model (exported, then pruned by surgery with that plan).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import HeartError
from .common import (add_data_flags, add_json_flag, add_model_flags, add_output_flag, add_plan_flag, emit_json,
                     load_model_from_args, new_parser)


def register(sub: Any) -> None:
    p = new_parser(sub, "finetune", "fine-tune a model under a plan (pruned structure kept); accuracy before and after", (
        "heart-onnx finetune --model demo-vit --plan plan.json -o demo_vit.ft.pt",
        "heart-onnx finetune --model demo-vit --plan plan.json --epochs 4 -o ft.pt --export ft.pruned.onnx --json",
        "heart-onnx finetune --model vit_b_16 --weights vit.pth --plan plan.json --data folder:train --eval folder:val -o ft.pt",
        "heart-onnx verify ft.pruned.onnx --model demo-vit --weights ft.pt --plan ft.plan.json   # afterwards",
    ))
    add_model_flags(p)
    add_plan_flag(p, help="plan JSON from 'heart-onnx plan' for this model (heads and tokens; no weight merges)")
    add_data_flags(p, default="digits:train", what="training", batch_size=64)
    p.add_argument("--eval", default=None, metavar="SPEC",
                   help="held-out data for accuracy/loss before and after (default: digits:test for digits training "
                        "data, else the training data)")
    p.add_argument("--eval-samples", type=int, default=None, metavar="N", help="evaluation samples (default: all of --eval)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate, cosine-decayed (default 5e-4)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature against the dense model (default 2)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of cross-entropy vs distillation when the data has labels (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed for shuffling and initialisation (default 0)")
    add_output_flag(p, "the fine-tuned weights (a state dict, .pt)")
    p.add_argument("--plan-output", default=None, metavar="PATH",
                   help="where to write the plan re-bound to the fine-tuned weights (default: <output stem>.plan.json)")
    p.add_argument("--export", default=None, metavar="OUT.onnx",
                   help="also export the fine-tuned model and prune it with the plan: the deployable ONNX (default: none)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _eval_spec(args: argparse.Namespace) -> tuple[str, bool]:
    if args.eval:
        return args.eval, True
    if args.data.strip().startswith("digits"):
        return "digits:test", True
    return args.data, False


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise HeartError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("samples", "eval_samples"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise HeartError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not args.lr > 0 or not args.temperature > 0 or not 0 <= args.alpha <= 1 or args.weight_decay < 0:
        raise HeartError("--lr and --temperature must be > 0, --alpha in [0, 1], --weight-decay >= 0")
    if Path(args.output).suffix == ".onnx":
        raise HeartError(f"-o {args.output} is the fine-tuned weights file (.pt); write the ONNX model with --export")
    if args.export is not None and Path(args.export).suffix != ".onnx":
        raise HeartError(f"--export {args.export} must end in .onnx")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_data
    from ..fileio import atomic_path, check_output_path
    from ..finetune import evaluate, finetune
    from ..models.registry import adapt
    from ..plan import Plan

    _check_args(args)
    inputs = [x for x in (args.weights, args.plan, getattr(args, "model", None)) if x]
    out = check_output_path(args.output, *inputs)
    plan_out = check_output_path(args.plan_output or out.with_suffix(".plan.json"), *inputs, out)
    export_out = check_output_path(args.export, *inputs, out, plan_out) if args.export else None
    plan = Plan.load(args.plan)
    if plan.merges:
        raise HeartError("this plan merges weights: fine-tune a heads/tokens plan first, then plan the merges on the result")
    torch.manual_seed(args.seed)
    model = load_model_from_args(args)
    adapter = adapt(model)
    eval_spec, held_out = _eval_spec(args)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))

    evald = load_data(eval_spec, adapter, n=args.eval_samples, batch_size=max(args.batch_size, 128), seq_len=args.seq_len)
    dense = evaluate(adapter, None, evald)
    before = evaluate(adapter, plan, evald, dense=adapter)  # checks the plan belongs to this model
    train = load_data(args.data, adapter, n=args.samples, batch_size=args.batch_size, seq_len=args.seq_len,
                      shuffle=True, seed=args.seed)

    def progress(epoch: int, epochs: int, loss: float) -> None:
        log(f"epoch {epoch}/{epochs}: training loss {loss:.4f}")

    res = finetune(model, plan, train, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                   temperature=args.temperature, alpha=args.alpha, seed=args.seed, progress=progress)
    after = evaluate(res.model, res.plan, evald, dense=adapter)

    with atomic_path(out, suffix=".pt") as tmp:
        torch.save({k: v.detach().cpu().contiguous() for k, v in res.model.state_dict().items()}, tmp)
    res.plan.save(plan_out)
    summary: dict[str, Any] = {
        "model": args.model or args.weights, "plan": args.plan, "train_data": args.data, "eval_data": eval_spec,
        "eval_held_out": held_out, "epochs": res.epochs, "steps": res.steps, "seconds": round(res.seconds, 3),
        "train_losses": res.losses, "dense": dense, "before": before, "after": after,
        "output": str(out), "plan_output": str(plan_out), "export": None,
    }
    if export_out is not None:
        summary["export"] = _export(res, adapter, evald, export_out)
    if args.json:
        emit_json(summary)
    else:
        print(format_summary(summary))
    return 0


def _export(res: Any, adapter: Any, evald: Any, target: Path) -> dict[str, Any]:
    """Export the fine-tuned model, prune it with the re-bound plan into ``target``; ONNX vs masked on the eval data."""
    import shutil
    import tempfile

    import numpy as np
    import torch

    from .._deps import require
    from ..data import split_batch
    from ..models.export import export
    from ..models.masking import apply_plan
    from ..models.registry import adapt
    from ..surgery.api import prune

    ft = adapt(res.model)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        dense = export(ft, ft.example_inputs(2), tmpdir / "finetuned.dense.onnx")
        prune(dense, res.plan, target)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    ort = require("onnxruntime", "checking the exported model")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(target), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    diff, correct, n, labelled = 0.0, 0, 0, True
    with torch.no_grad(), apply_plan(ft, res.plan) as masked:
        for batch in evald:
            x, y = split_batch(batch)
            feed = {k: v.numpy() for k, v in x.items()} if isinstance(x, dict) else {names[0]: x.numpy()}
            got = sess.run(None, {k: v for k, v in feed.items() if k in names})[0]
            ref = masked.forward(x).numpy()
            diff = max(diff, float(np.abs(got - ref).max()))
            if y is not None and got.ndim == 2:
                correct += int((got.argmax(-1) == y.numpy()).sum())
            else:
                labelled = False
            n += got.shape[0]
    return {"path": str(target), "accuracy": correct / n if labelled and n else None, "max_abs_diff_vs_masked": diff}


def _fmt(r: dict[str, Any]) -> str:
    parts = []
    if r.get("accuracy") is not None:
        parts.append(f"accuracy {r['accuracy']:.4f}")
    if r.get("ce_loss") is not None:
        parts.append(f"loss {r['ce_loss']:.4f}")
    if r.get("kl_to_dense") is not None:
        parts.append(f"KL to dense {r['kl_to_dense']:.4f}")
    return ", ".join(parts) or "-"


def format_summary(s: dict[str, Any]) -> str:
    where = f"{s['eval_data']} ({s['after']['samples']} samples{'' if s['eval_held_out'] else ', the training data'})"
    lines = [f"evaluated on {where}",
             f"dense           {_fmt(s['dense'])}",
             f"pruned before   {_fmt(s['before'])}",
             f"pruned after    {_fmt(s['after'])}   ({s['epochs']} epochs, {s['steps']} steps, {s['seconds']:.1f} s)",
             f"wrote           {s['output']} (state dict), {s['plan_output']} (plan for the fine-tuned weights)"]
    e = s.get("export")
    if e:
        acc = f", accuracy {e['accuracy']:.4f}" if e.get("accuracy") is not None else ""
        lines.append(f"wrote           {e['path']} (pruned ONNX{acc}, max |ONNX - masked| {e['max_abs_diff_vs_masked']:.2e})")
    return "\n".join(lines)
