"""``heart-onnx plan``: a loss budget (nats) and a sensitivity file become a Plan JSON."""
from __future__ import annotations

import argparse
from typing import Any

from .common import add_json_flag, add_output_flag, emit_json, int_list, new_parser


def register(sub: Any) -> None:
    p = new_parser(sub, "plan", "turn a loss budget (nats of mean calibration loss) into a pruning plan", (
        "heart-onnx plan sens.npz --budget 0.05 -o plan.json",
        "heart-onnx plan sens.npz --budget 0.1 --targets heads,tokens --scorer linear --fuse-dropped -o plan.json",
        "heart-onnx plan sens.npz --budget 0.02 --targets pairs --granularity 2:4 -o plan.json --json",
    ))
    p.add_argument("sens", metavar="SENS.npz", help="sensitivities from 'heart-onnx analyze'")
    p.add_argument("--budget", required=True, metavar="NATS",
                   help="allowed increase of mean calibration loss in nats (e.g. 0.05)")
    add_output_flag(p, "the plan JSON (and its .pairs.npz sidecar when weights merge)")
    p.add_argument("--targets", default=None, metavar="LIST",
                   help="comma-separated subset of heads,tokens,pairs (default: every target the file has)")
    p.add_argument("--scorer", default="cls_attention", choices=("cls_attention", "linear"),
                   help="run-time token scorer (default cls_attention; linear needs fitted scorers)")
    p.add_argument("--fuse-dropped", action="store_true", help="append one token: the score-weighted mean of the dropped ones")
    p.add_argument("--token-layers", default=None, metavar="LIST",
                   help="blocks after which tokens are pruned, e.g. 3,6,9 (default: every 3rd block)")
    p.add_argument("--granularity", default="unstructured", choices=("unstructured", "2:4", "channel"),
                   help="weight-pair merge granularity (default unstructured)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for language models (default: the file's)")
    p.add_argument("--min-keep", type=int, default=None, help="fewest tokens the last stage keeps (default prefix + 1)")
    p.add_argument("--refine", action="store_true", help="fill the leftover budget with steps off the greedy curve")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..budget import check_budget, pareto
    from ..fileio import check_output_path
    from ..sensitivities import Sensitivities

    budget = check_budget(args.budget)  # before any work: a bad budget is one line, exit 1
    out = check_output_path(args.output, args.sens)
    sens = Sensitivities.load(args.sens)
    curve = pareto(sens, args.targets, int_list(args.token_layers, "--token-layers"), args.granularity,
                   scorer=args.scorer, fuse_dropped=args.fuse_dropped, seq_len=args.seq_len, min_keep=args.min_keep)
    plan = curve.to_plan(budget, refine=args.refine)
    plan.save(out)
    summary = summarize(plan)
    summary["output"] = str(out)
    if args.json:
        emit_json(summary)
    else:
        print(format_summary(summary))
    return 0


def summarize(plan: Any) -> dict[str, Any]:
    """JSON-able summary of a plan (what the CLI prints)."""
    g = plan.geometry
    notes = dict(plan.notes)
    return {
        "budget": plan.budget, "predicted_loss_change": plan.predicted_loss_change,
        "predicted_by_target": notes.get("predicted_by_target", {}), "calibration": notes.get("calibration", {}),
        "flops_dense": plan.flops_dense, "flops_pruned": plan.flops_pruned,
        "flops_effective": notes.get("flops_effective", plan.flops_pruned),
        "reduction": (1.0 - plan.flops_pruned / plan.flops_dense) if plan.flops_dense else 0.0,
        "heads_removed": {int(l): list(v) for l, v in sorted(plan.heads.items()) if len(v)},
        "heads_total": int(g.get("heads", 0) or 0) * int(g.get("layers", 0) or 0),
        "tokens": [{"after_layer": t.after_layer, "keep": t.keep} for t in plan.tokens],
        "seq_len": g.get("seq_len"), "token_scorer": plan.token_scorer, "fuse_dropped": plan.fuse_dropped,
        "merges": [{"weight": m.weight, "granularity": m.granularity, "count": int(len(m.pruned))} for m in plan.merges],
    }


def _g(x: float | None) -> str:
    if x is None:
        return "-"
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {unit}FLOPs"
    return f"{x:.4g} FLOPs"


def format_summary(s: dict[str, Any]) -> str:
    by = ", ".join(f"{k} {v:.4g}" for k, v in s["predicted_by_target"].items())
    lines = [
        f"budget                {s['budget']:.4g} nats",
        f"predicted loss change {s['predicted_loss_change']:.4g} nats" + (f" ({by})" if by else ""),
        f"FLOPs                 {_g(s['flops_dense'])} -> {_g(s['flops_pruned'])} (-{100 * s['reduction']:.1f}%)",
    ]
    if s["flops_effective"] is not None and s["flops_pruned"] is not None and s["flops_effective"] < s["flops_pruned"]:
        lines.append(f"  with sparse kernels {_g(s['flops_effective'])}")
    if s["heads_removed"]:
        n = sum(len(v) for v in s["heads_removed"].values())
        per = "  ".join(f"L{l}:{len(v)}" for l, v in s["heads_removed"].items())
        lines.append(f"heads removed         {n} of {s['heads_total']}: {per}")
    else:
        lines.append("heads removed         none")
    if s["tokens"]:
        per = ", ".join(f"after {t['after_layer']}: {t['keep']}" for t in s["tokens"])
        fuse = " +1 fused" if s["fuse_dropped"] else ""
        lines.append(f"tokens kept           {per} (of {s['seq_len']}; {s['token_scorer']}{fuse})")
    else:
        lines.append("tokens kept           all")
    if s["merges"]:
        n = sum(m["count"] for m in s["merges"])
        lines.append(f"weight merges         {n} in {len(s['merges'])} weights ({s['merges'][0]['granularity']})")
    lines.append(f"wrote                 {s['output']}")
    return "\n".join(lines)
