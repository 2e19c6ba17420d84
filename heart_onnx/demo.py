"""``heart-onnx demo``: the whole method on the embedded demo models, end to end, offline, in minutes.

Demo ViT (digits): analyse heads and tokens (Hessian), plan at a few loss budgets and at >= 40% fewer
FLOPs, export to ONNX, prune by surgery, verify against the masked PyTorch model, measure held-out
accuracy and loss change, time dense vs pruned side by side on ONNX Runtime CPU, fine-tune the
>= 40% plan briefly and report before/after. Demo CNN: CAMP-HiVe weight-pair merging at 50%
unstructured sparsity, surgery, accuracy. Writes a Markdown report with PNG plots and the ONNX files.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import HeartError
from .fileio import write_text_atomic

DEFAULT_BUDGETS = (0.01, 0.03, 0.1)
TARGET_REDUCTION = 0.40


@dataclass
class Row:
    name: str
    budget: float | None
    heads_removed: int
    tokens: str
    flops_ratio: float
    acc_dense: float
    acc_pruned: float
    predicted: float
    measured: float
    max_abs_diff: float
    latency_ratio: float
    throughput_gain: float
    acc_finetuned: float | None = None
    extra: dict = field(default_factory=dict)


def _kl(dense: np.ndarray, pruned: np.ndarray) -> float:
    """Mean KL(dense || pruned) of the softmax distributions, nats. (B, C) each."""
    def logsm(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, lq = logsm(dense.astype(np.float64)), logsm(pruned.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _ort(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(sess, x: np.ndarray, batch: int = 128) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _plots(out: Path, curve: Any, rows: list[Row], sens: Any) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(np.maximum(curve.loss, 1e-5), curve.flops / curve.flops_dense * 100, lw=1.5, label="predicted (Pareto)")
    for r in rows:
        if r.name.startswith("ViT"):
            ax.scatter([max(r.predicted, 1e-5)], [r.flops_ratio * 100], c="C3", zorder=3)
            ax.scatter([max(r.measured, 1e-5)], [r.flops_ratio * 100], c="C2", marker="x", zorder=3)
    ax.scatter([], [], c="C3", label="plan (predicted)")
    ax.scatter([], [], c="C2", marker="x", label="plan (measured, held-out)")
    ax.set_xscale("log")
    ax.set_xlabel("loss change (nats)")
    ax.set_ylabel("FLOPs (% of dense)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    files.append("pareto.png")
    if sens.head is not None:
        fig, ax = plt.subplots(figsize=(4.5, 3))
        im = ax.imshow(np.log10(np.clip(sens.head, 1e-7, None)), cmap="viridis", aspect="auto")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title("head sensitivity (log10 nats)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "heads.png", dpi=120)
        plt.close(fig)
        files.append("heads.png")
    return files


def _bench(dense: Path, pruned: Path, batch: int, repeats: int) -> tuple[float, float]:
    from .runtime.api import benchmark_pair

    res = benchmark_pair(dense, pruned, backend="ort-cpu", batch=batch, warmup=5, repeats=repeats)
    a, b = res["a"], res["b"]
    return b.median_ms / a.median_ms, a.median_ms / b.median_ms - 1.0


def run_demo(out_dir: str | Path = "heart-onnx-demo", budgets: tuple[float, ...] = DEFAULT_BUDGETS,
             n_calib: int = 128, finetune_epochs: int = 4, bench_batch: int = 64, bench_repeats: int = 30,
             cnn: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns the JSON-able summary (also written to ``out_dir/summary.json``).

    Options (defaults): ``out_dir="heart-onnx-demo"``; ``budgets=(0.01, 0.03, 0.1)`` nats;
    ``n_calib=128`` calibration (val split) images for the sensitivities (the planner's calibration
    measures plans on all 300 val images); ``finetune_epochs=4``; ``bench_batch=64``, ``bench_repeats=30``
    for the ONNX Runtime timing; ``cnn=True`` runs the weight-pair part on the demo CNN.
    """
    import torch

    from . import budget as budget_mod
    from .data import load_data
    from .finetune import finetune
    from .models.demo import demo_cnn, demo_vit, digits_split
    from .models.export import export
    from .models.masking import apply_plan
    from .sensitivity.api import analyze
    from .surgery.api import prune

    for b in budgets:
        budget_mod.check_budget(b)
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits_split()
    xt = x_test.numpy()
    yt = y_test.numpy()

    # ---------------------------------------------------------------- ViT: analyse and plan
    model = demo_vit()
    calib = load_data("digits", model, n=n_calib, batch_size=32, split="calib")
    log(f"[1/6] analysing the demo ViT: Hessian head and token sensitivities on {n_calib} calibration (val) images")
    t0 = time.perf_counter()
    sens = analyze(model, calib, targets=("heads", "tokens"))
    t_analyze = time.perf_counter() - t0
    from .calibration import calibrate_on_data
    from .data import concat_batches

    x_calib, _ = concat_batches(load_data("digits", model, batch_size=512, split="calib"))  # all 300 val images
    t0 = time.perf_counter()
    cal = calibrate_on_data(model, sens, x_calib)
    t_cal = time.perf_counter() - t0
    n_curve = sum(c["n"] for c in cal.get("curves", {}).values())
    log(f"      calibrated the planner on {len(cal['points']) + n_curve} measured plans on the {len(x_calib)} val images "
        f"(never trained on) in {t_cal:.1f} s: per target "
        + ", ".join(f"{t} {cal.get(t, 1.0):.3g} x^{cal.get('exponents', {}).get(t, 1):.2f}" for t in ("heads", "tokens"))
        + "; loss maps for " + ", ".join(sorted(cal.get("curves", {}))))
    sens.save(out / "demo_vit.sens.npz")
    curve = budget_mod.pareto(sens, ["heads", "tokens"])
    plans = [(f"ViT budget {b:g}", b, curve.to_plan(b)) for b in budgets]
    saved = 1.0 - curve.flops / curve.flops_dense
    ok = np.nonzero(saved >= TARGET_REDUCTION)[0]
    if len(ok):
        i40 = int(ok[np.argmin(curve.loss[ok])])
        b40 = float(curve.loss[i40]) * (1 + 1e-9) + 1e-12
        plans.append((f"ViT >= {TARGET_REDUCTION:.0%} FLOPs", b40, curve.to_plan(b40)))

    log(f"[2/6] exporting the dense model to ONNX ({out / 'demo_vit.onnx'})")
    dense_path = export(model, x_test[:1], out / "demo_vit.onnx")
    dense_sess = _ort(dense_path)
    dense_logits = _run(dense_sess, xt)
    acc_dense = float((dense_logits.argmax(-1) == yt).mean())

    rows: list[Row] = []
    log(f"[3/6] pruning by graph surgery, verifying against the masked PyTorch model, timing ({len(plans)} plans)")
    for name, b, plan in plans:
        tag = name.split()[-1].replace("%", "pct").replace(">=", "ge")
        ppath = prune(dense_path, plan, out / f"demo_vit.pruned-{tag}.onnx")
        plan.save(out / f"plan-{tag}.json")
        logits = _run(_ort(ppath), xt)
        with torch.no_grad(), apply_plan(model, plan) as masked:
            ref = masked.forward(x_test).numpy()
        diff = float(np.abs(logits - ref).max())
        lat_ratio, gain = _bench(dense_path, ppath, bench_batch, bench_repeats)
        rows.append(Row(name, b, sum(len(v) for v in plan.heads.values()),
                        ", ".join(f"L{s.after_layer}:{s.keep}" for s in plan.tokens) or "all",
                        plan.flops_pruned / plan.flops_dense, acc_dense, float((logits.argmax(-1) == yt).mean()),
                        float(plan.predicted_loss_change or 0.0), _kl(dense_logits, logits), diff, lat_ratio, gain,
                        extra={"onnx": ppath.name, "masked_accuracy": float((ref.argmax(-1) == yt).mean()),
                               "expected_gain_from_flops": plan.flops_dense / plan.flops_pruned - 1.0}))
        log(f"      {name}: FLOPs {rows[-1].flops_ratio:.1%} of dense, accuracy {rows[-1].acc_pruned:.3f}, "
            f"max |ONNX - masked| {diff:.2e}, latency x{lat_ratio:.2f}")

    # ---------------------------------------------------------------- fine-tuning the >= 40% plan
    ft = None
    target = next((r for r, (_, _, p) in zip(rows, plans) if r.name.startswith("ViT >=")), None)
    if target is not None and finetune_epochs > 0:
        plan40 = plans[rows.index(target)][2]
        log(f"[4/6] fine-tuning under the >= 40% plan for {finetune_epochs} epochs (structure kept)")
        train = [(x_train[i:i + 64], y_train[i:i + 64]) for i in range(0, len(x_train), 64)]
        res = finetune(model, plan40, train, epochs=finetune_epochs)
        ft_dense = export(res.model, x_test[:1], out / "demo_vit.finetuned.dense.onnx")
        ft_path = prune(ft_dense, res.plan, out / "demo_vit.finetuned.pruned.onnx")
        ft_logits = _run(_ort(ft_path), xt)
        target.acc_finetuned = float((ft_logits.argmax(-1) == yt).mean())
        ft = {"epochs": res.epochs, "seconds": res.seconds, "accuracy_before": target.acc_pruned,
              "accuracy_after": target.acc_finetuned, "accuracy_dense": acc_dense, "onnx": ft_path.name}
        log(f"      accuracy {target.acc_pruned:.3f} -> {target.acc_finetuned:.3f} (dense {acc_dense:.3f})")
    else:
        log("[4/6] fine-tuning skipped")

    # ---------------------------------------------------------------- CNN: weight-pair merging
    cnn_rows: list[dict[str, Any]] = []
    if cnn:
        log("[5/6] demo CNN: CAMP-HiVe weight-pair merging (Hessian diagonal + curvature), 50% unstructured and 2:4")
        cmodel = demo_cnn()
        ccalib = load_data("digits", cmodel, n=n_calib, batch_size=32, split="calib")
        csens = analyze(cmodel, ccalib, targets=("pairs",))
        cdense = export(cmodel, x_test[:1], out / "demo_cnn.onnx")
        c_logits = _run(_ort(cdense), xt)
        from .pairing import entries, make_merge

        ents = entries(csens.pairs)
        for sparsity, gran in ((0.5, "unstructured"), (0.5, "2:4")):
            # the stem conv (1-3 input channels) stays dense, as is customary for sparse CNNs
            merges = tuple(make_merge(e, gran, sparsity, method="camp", name=n) for n, e in sorted(ents.items())
                           if _supports(e, gran) and int(np.asarray(e["shape"])[1]) > 3)
            cplan = _cnn_plan(csens, merges)
            cpath = prune(cdense, cplan, out / f"demo_cnn.merged-{gran.replace(':', 'of')}.onnx")
            m_logits = _run(_ort(cpath), xt)
            with torch.no_grad(), apply_plan(cmodel, cplan) as masked:
                ref = masked.forward(x_test).numpy()
            cnn_rows.append({"granularity": gran, "sparsity": sparsity, "acc_dense": float((c_logits.argmax(-1) == yt).mean()),
                             "acc_merged": float((m_logits.argmax(-1) == yt).mean()), "measured_kl": _kl(c_logits, m_logits),
                             "max_abs_diff_vs_masked": float(np.abs(m_logits - ref).max()), "onnx": cpath.name})
            log(f"      {gran} {sparsity:.0%}: accuracy {cnn_rows[-1]['acc_dense']:.3f} -> {cnn_rows[-1]['acc_merged']:.3f}")

    log("[6/6] writing the report")
    files = _plots(out, curve, rows, sens)
    summary = {
        "vit": {"accuracy_dense": acc_dense, "analyze_seconds": t_analyze, "calibration_images": n_calib,
                "calibration_measure_images": int(len(x_calib)), "calibrate_seconds": t_cal,
                "calibration": {k: v for k, v in cal.items() if k != "points"},
                "held_out": f"digits test split, {len(yt)} images (train_test_split test_size=0.25, random_state=0, stratified)",
                "rows": [r.__dict__ for r in rows], "finetune": ft},
        "cnn": cnn_rows,
        "benchmark": {"backend": "ort-cpu", "batch": bench_batch, "repeats": bench_repeats,
                      "protocol": "interleaved dense/pruned, warm-up 5, median latency"},
        "files": sorted(p.name for p in out.iterdir() if p.is_file()) + files,
        "seconds": time.perf_counter() - t_start,
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1, default=float))
    write_text_atomic(out / "report.md", report_markdown(summary, files))
    return summary


def _supports(entry: Any, gran: str) -> bool:
    from .pairing import supports

    return supports(entry, gran)


def _cnn_plan(sens: Any, merges: tuple) -> Any:
    from .pairing import anchors_for, entries
    from .plan import Plan

    geo = sens.meta.get("geometry", {})
    return Plan(fingerprint=sens.meta["fingerprint"], family=sens.meta.get("family", "cnn"), geometry=geo,
                merges=merges, anchors=anchors_for(merges, entries(sens.pairs)), prefix_tokens=0)


def table_lines(summary: dict[str, Any]) -> list[str]:
    """The demo table as Markdown lines."""
    head = ("| plan | heads removed | tokens kept (after layer: K) | FLOPs vs dense | accuracy dense | accuracy pruned "
            "| after fine-tuning | predicted loss change | measured loss change | max abs diff ONNX vs masked "
            "| latency ratio | throughput gain (FLOPs-implied) |")
    lines = [head, "|" + "---|" * 12]
    for r in summary["vit"]["rows"]:
        ft = f"{r['acc_finetuned']:.3f}" if r.get("acc_finetuned") is not None else ""
        lines.append(f"| {r['name']} | {r['heads_removed']} | {r['tokens']} | {r['flops_ratio']:.1%} | {r['acc_dense']:.3f} "
                     f"| {r['acc_pruned']:.3f} | {ft} | {r['predicted']:.4f} | {r['measured']:.4f} | {r['max_abs_diff']:.1e} "
                     f"| {r['latency_ratio']:.2f} | {r['throughput_gain']:+.0%} ({r['extra']['expected_gain_from_flops']:+.0%}) |")
    return lines


def report_markdown(summary: dict[str, Any], images: list[str]) -> str:
    v = summary["vit"]
    parts = ["# heart-onnx demo report", "",
             f"Demo ViT on scikit-learn digits; held-out: {v['held_out']}. Dense accuracy {v['accuracy_dense']:.3f}. "
             f"Sensitivities from {v['calibration_images']} calibration images (digits val split, never trained on) "
             f"in {v['analyze_seconds']:.1f} s; predictions calibrated on plans measured on "
             f"{v.get('calibration_measure_images', v['calibration_images'])} val images. "
             f"Latency: ONNX Runtime CPU, batch {summary['benchmark']['batch']}, {summary['benchmark']['protocol']}.", "",
             *table_lines(summary), ""]
    if v.get("finetune"):
        f = v["finetune"]
        parts += [f"Fine-tuning ({f['epochs']} epochs, {f['seconds']:.0f} s, structure kept): accuracy "
                  f"{f['accuracy_before']:.3f} -> {f['accuracy_after']:.3f} (dense {f['accuracy_dense']:.3f}).", ""]
    if summary["cnn"]:
        parts += ["## Demo CNN: weight-pair merging (CAMP-HiVe)", "",
                  "| granularity | sparsity | accuracy dense | accuracy merged | measured KL | max abs diff ONNX vs masked |",
                  "|---|---|---|---|---|---|"]
        for c in summary["cnn"]:
            parts.append(f"| {c['granularity']} | {c['sparsity']:.0%} | {c['acc_dense']:.3f} | {c['acc_merged']:.3f} "
                         f"| {c['measured_kl']:.4f} | {c['max_abs_diff_vs_masked']:.1e} |")
        parts.append("")
    parts += [f"![{i}]({i})" for i in images]
    parts += ["", f"Total time {summary['seconds']:.0f} s."]
    return "\n".join(parts) + "\n"
