"""``heart-onnx demo``: the whole pipeline on the embedded demo models (no network, no GPU)."""
from __future__ import annotations

import argparse
import sys

from .common import add_json_flag, emit_json, float_list, new_parser


def register(sub) -> None:
    p = new_parser(sub, "demo", "run the whole pipeline on the embedded demo ViT and CNN and write a report",
                   ("heart-onnx demo", "heart-onnx demo -o /tmp/demo --budgets 0.01,0.05 --json",
                    "heart-onnx demo --finetune-epochs 0 --no-cnn   # quicker"))
    p.add_argument("-o", "--output", default="heart-onnx-demo", metavar="DIR",
                   help="directory for the report, plots, plans and ONNX files (default: heart-onnx-demo)")
    p.add_argument("--budgets", default="0.01,0.03,0.1", metavar="B,B,...",
                   help="loss budgets in nats of mean calibration loss (default: 0.01,0.03,0.1)")
    p.add_argument("--calib", type=int, default=128, metavar="N", help="calibration images (default: 128)")
    p.add_argument("--finetune-epochs", type=int, default=4, metavar="N",
                   help="fine-tuning epochs for the >= 40%% FLOPs plan, 0 to skip (default: 4)")
    p.add_argument("--bench-batch", type=int, default=64, metavar="N", help="batch for the latency comparison (default: 64)")
    p.add_argument("--no-cnn", action="store_true", help="skip the weight-pair merging part on the demo CNN")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo, table_lines

    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    summary = run_demo(args.output, budgets=float_list(args.budgets, "--budgets (nats)"), n_calib=args.calib,
                       finetune_epochs=args.finetune_epochs, bench_batch=args.bench_batch, cnn=not args.no_cnn, log=log)
    if args.json:
        emit_json(summary)
        return 0
    print()
    print("\n".join(table_lines(summary)))
    for c in summary["cnn"]:
        print(f"CNN {c['granularity']} {c['sparsity']:.0%}: accuracy {c['acc_dense']:.3f} -> {c['acc_merged']:.3f}")
    print(f"\nreport: {args.output}/report.md ({summary['seconds']:.0f} s)")
    return 0
