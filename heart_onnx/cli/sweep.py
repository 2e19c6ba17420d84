"""``heart-onnx sweep``: the Pythia batch-testing grid, resumable, with CSV and PNG outputs."""
from __future__ import annotations

import argparse

from .common import add_json_flag, emit_json, new_parser


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from exc
    return parse


def register(sub) -> None:
    p = new_parser(sub, "sweep", "time Pythia LLMs over backends, precisions, batch sizes, lengths and power modes", (
        "heart-onnx sweep --models pythia-70m,pythia-160m --backends torch-cpu,ort-cpu --batches 1,4 --prompts 32,128 --new-tokens 8 -o artifacts/sweep",
        "heart-onnx sweep --models /ckpt/pythia-410m --text wiki.txt --backends trt --precisions fp16,int8 -o sweep/",
        "heart-onnx sweep --models pythia-1b --backends trt --power-modes 0,1 --set-power-mode -o sweep/   # Jetson",
    ))
    p.add_argument("--models", type=_csv(str), default=("pythia-70m",),
                   help="pythia-70m..1.4b (random init, speed only), local checkpoint folders (real weights), or tiny:... (default pythia-70m)")
    p.add_argument("--backends", type=_csv(str), default=("torch-cpu",), help="torch-cpu, torch-cuda, ort-cpu, ort-cuda, ort-trt, trt (default torch-cpu)")
    p.add_argument("--precisions", type=_csv(str), default=("fp32",), help="fp32, fp16, bf16 (torch), int8 (TensorRT) (default fp32)")
    p.add_argument("--batches", type=_csv(int), default=(1,), help="batch sizes (default 1)")
    p.add_argument("--prompts", type=_csv(int), default=(32,), help="prompt lengths in tokens (default 32)")
    p.add_argument("--new-tokens", type=_csv(int), default=(8,), help="generated tokens (default 8)")
    p.add_argument("--power-modes", type=_csv(str), default=("current",),
                   help="Jetson nvpmodel modes to sweep; needs --set-power-mode (default: the current mode, recorded)")
    p.add_argument("--set-power-mode", action="store_true", help="allow switching the Jetson power mode (sudo nvpmodel -m)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per cell (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per cell first (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and prompts (default 0)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: runtime's choice)")
    p.add_argument("--text", dest="text_file", help="text file for perplexity (real weights only)")
    p.add_argument("--plan", help="a Plan JSON (Hessian head pruning) applied by masking before measuring")
    p.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"), help="ONNX exporter for ort/trt (default torchscript)")
    p.add_argument("--power", default="auto", choices=("auto", "jtop", "tegrastats", "nvml", "none"), help="power source (default auto)")
    p.add_argument("--retry-failed", action="store_true", help="re-run cells recorded as failed")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="results folder (results.jsonl, results.csv, *.png)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ..errors import HeartError
    from ..llm.report import export_csv, plot_results
    from ..llm.sweep import SweepConfig, run_sweep

    for opt, path in (("--plan", args.plan), ("--text", args.text_file)):
        if path is not None and not os.path.isfile(path):
            raise HeartError(f"{opt} file {path} does not exist: give the path of an existing file")
    cfg = SweepConfig(
        models=args.models, backends=args.backends, precisions=args.precisions, batches=args.batches, prompts=args.prompts,
        new_tokens=args.new_tokens, power_modes=args.power_modes, set_power_mode=args.set_power_mode, repeats=args.repeats,
        warmup=args.warmup, seed=args.seed, threads=args.threads, text_file=args.text_file, plan=args.plan,
        exporter=args.exporter, power=args.power, retry_failed=args.retry_failed,
    )
    s = run_sweep(cfg, args.output, progress=not args.quiet)
    csv_path = export_csv(s.results, f"{args.output}/results.csv")
    pngs = [] if args.no_plots else plot_results(s.results, args.output)
    summary = {"results": str(s.results), "csv": str(csv_path), "plots": [str(p) for p in pngs], "cells": s.total,
               "skipped_finished": s.skipped, "ran": s.ran, "failed": s.failed}
    if args.json:
        emit_json(summary)
    else:
        print(f"{s.ran} cells run ({s.failed} failed), {s.skipped} already finished; {s.results}, {csv_path}"
              + (f", {len(pngs)} plots" if pngs else ""))
    return 0
