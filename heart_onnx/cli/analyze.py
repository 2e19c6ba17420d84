"""``heart-onnx analyze``: Hessian sensitivities of heads, tokens (and weight pairs) -> ``sens.npz``."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import HeartError
from .common import (DEMO_MODELS, add_data_flags, add_json_flag, add_model_flags, add_output_flag, emit_json,  # noqa: F401
                     load_named_model, new_parser)


def register(sub: Any) -> None:
    p = new_parser(sub, "analyze", "second-order (Hessian) sensitivities of heads, tokens and weights over calibration data", (
        "heart-onnx analyze --model demo-vit --data digits -o sens.npz",
        "heart-onnx analyze --model vit_b_16 --weights vit_b16.pth --data folder:calib_images -o sens.npz --json",
        "heart-onnx analyze --model ./pythia-160m --data text:calib.txt --seq-len 256 --targets heads -o sens.npz",
        "torchrun --nproc-per-node 2 -m heart_onnx analyze --model demo-vit --data digits -o sens.npz",
    ))
    add_model_flags(p, required=True)
    add_data_flags(p, default="digits", what="calibration", batch_size=32)
    p.add_argument("--targets", default=None, metavar="LIST",
                   help="comma-separated heads,tokens,pairs (default: heads,tokens for ViTs, heads for LMs, pairs for CNNs)")
    p.add_argument("--method", default="hessian", help="hessian (default) or a baseline: magnitude, taylor, fisher, random, cls_attention")
    p.add_argument("--probes", type=int, default=None, help="random-sign HVP probes, or sampled labels for the GGN estimator, per batch (default 32)")
    p.add_argument("--estimator", default="auto", choices=("auto", "ggn", "hvp"),
                   help="auto (default): ggn (output-space Gauss-Newton) for --loss kl, else hvp (random-sign HVP probes)")
    p.add_argument("--exact", action="store_true", help="one HVP per component instead of probes (slow reference)")
    p.add_argument("--loss", default="kl", choices=("kl", "ce", "mse", "cosine"),
                   help="calibration loss (default kl: label-free, against the dense model; ce needs labels)")
    p.add_argument("--token-scorer", default="cls_attention", choices=("cls_attention", "linear", "oracle"),
                   help="run-time scorer the token keep curve assumes (default cls_attention)")
    p.add_argument("--holdout", type=float, default=0.25, help="fraction of batches held out to rate the token scorers (default 0.25)")
    p.add_argument("--seed", type=int, default=0, help="probe seed (default 0)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--calibrate", default=None, metavar="SPEC",
                   help="data spec to calibrate the planner on (measured plans, heart_onnx.calibration; e.g. digits:val): "
                        "never training or held-out data (default: none, predictions stay raw second-order sums)")
    add_output_flag(p, "the sensitivities (.npz)")
    add_json_flag(p)
    p.set_defaults(func=run)


def default_targets(adapter) -> tuple[str, ...]:
    if not adapter.num_heads:
        return ("pairs",)
    if getattr(adapter, "kind", "") == "lm" or adapter.seq_len is None:
        return ("heads",)
    return ("heads", "tokens")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_data
    from ..fileio import check_output_path
    from ..models.registry import adapt
    from ..sensitivity import distributed as D
    from ..sensitivity.api import DEFAULT_PROBES, analyze

    out = check_output_path(args.output, args.weights)
    if args.probes is not None and args.probes < 1:
        raise HeartError("--probes must be >= 1")
    if not 0 <= args.holdout < 1:
        raise HeartError("--holdout must be in [0, 1)")
    D.init_from_env()
    rank, _ = D.rank_world()
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and "LOCAL_RANK" in __import__("os").environ:
        device = torch.device("cuda", torch.cuda.current_device())
    model = load_named_model(args.model, args.weights, args.family).to(device)
    adapter = adapt(model)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else default_targets(adapter)
    calib = load_data(args.data, adapter, n=args.samples, batch_size=args.batch_size, seq_len=args.seq_len)

    def progress(done: int, total: int) -> None:
        if not args.json and rank == 0 and sys.stderr.isatty():
            print(f"\ranalyze: batch {done}/{total}", end="" if done < total else "\n", file=sys.stderr)

    sens = analyze(adapter, calib, targets=targets, method=args.method, probes=args.probes or DEFAULT_PROBES,
                   loss=args.loss, seed=args.seed, exact=args.exact, holdout=args.holdout,
                   token_scorer=args.token_scorer, estimator=args.estimator, progress=progress)
    sens.meta["model"] = args.model
    sens.meta["data"] = args.data
    if args.calibrate:
        from ..calibration import calibrate_on_data
        from ..data import concat_batches

        cal_targets = [t for t in targets if t in ("heads", "tokens")]
        if not cal_targets or getattr(adapter, "kind", "") == "lm" or adapter.seq_len is None:
            raise HeartError("--calibrate supports head/token targets of image classifiers: drop --calibrate")
        x_cal = concat_batches(load_data(args.calibrate, adapter, n=args.samples, batch_size=args.batch_size))[0].to(device)
        with torch.no_grad():
            calibrate_on_data(model.eval(), sens, x_cal, targets=cal_targets)
        sens.meta["calibration_data"] = args.calibrate
    if rank == 0:
        sens.save(out)
        summary = sens.summary()
        summary["output"] = str(out)
        if args.json:
            emit_json(summary)
        else:
            print(format_summary(sens, out))
    return 0


def format_summary(sens, out) -> str:
    m = sens.meta
    lines = [f"model       {m.get('model')} ({m.get('family')}), {m.get('n_samples')} samples of {m.get('data')}",
             f"method      {m.get('method')} ({m.get('estimator', '-')}), loss {m.get('loss')}, probes {m.get('probes')}, "
             f"{m.get('time_s', 0):.1f} s"]
    if sens.head is not None:
        L, H = sens.head.shape
        flat = sens.head.ravel().argsort()
        low = ", ".join(f"L{i // H}H{i % H} {sens.head.flat[i]:.2e}" for i in flat[:3])
        lines.append(f"heads       {L}x{H}; least sensitive: {low}")
    if sens.token_keep_curve is not None:
        c = sens.token_keep_curve
        N = c.shape[1] - 1
        half = N - (N - sens.prefix_tokens) // 2
        per = ", ".join(f"L{l} {c[l, half]:.2e}" for l in range(c.shape[0]))
        lines.append(f"tokens      keep {half}/{N} after each block ({m.get('token_scorer')}): {per} nats")
    for name, q in (sens.scorer_quality or {}).items():
        if isinstance(q, dict) and "spearman" in q:
            lines.append(f"scorer      {name}: Spearman {q['spearman']:.3f}, top-half overlap {q['topk_overlap']:.3f} (held out)")
    if sens.pairs:
        lines.append(f"pairs       {len({k.rsplit('/', 1)[0] for k in sens.pairs})} weights")
    lines.append(f"wrote       {out}")
    return "\n".join(lines)
