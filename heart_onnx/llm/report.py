"""Sweep results -> CSV and PNG plots (matplotlib, Agg backend: no display needed).

``export_csv(results.jsonl, out.csv)`` writes one row per cell (failed cells included, with their
error). ``plot_results(results.jsonl, out_dir)`` writes ``latency.png``, ``tokens_per_s.png`` and
``energy_per_token.png``: the metric against model size (parameters, log scale), one panel per
(precision, power mode), one line per (backend, batch, prompt length, new tokens).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from ..fileio import atomic_path
from .sweep import read_results

COLUMNS = ("cell_id", "status", "model", "params", "backend", "precision", "batch", "prompt", "new_tokens",
           "power_mode_requested", "power_mode_recorded", "jetson_clocks", "ttft_ms", "decode_tokens_per_s",
           "e2e_latency_ms", "e2e_tokens_per_s", "per_token_decode_ms_p90", "peak_rss_mb", "peak_cuda_mb",
           "energy_j_per_token", "mean_power_w", "power_source", "perplexity", "real_weights", "plan_sha", "seconds",
           "finished_at", "error")

PLOTS = {
    "latency.png": ("e2e_latency_ms", "end-to-end latency (ms)"),
    "tokens_per_s.png": ("decode_tokens_per_s", "decode tokens/s (all sequences)"),
    "energy_per_token.png": ("energy_j_per_token", "energy per token (J)"),
}


def export_csv(results: str | os.PathLike, out_csv: str | os.PathLike) -> Path:
    recs = read_results(results)
    with atomic_path(out_csv, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in recs:
                w.writerow({k: r.get(k) for k in COLUMNS})
    return Path(out_csv)


def plot_results(results: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in read_results(results) if r.get("status") == "ok"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    panels = sorted({(r["precision"], r.get("power_mode_recorded") or r["power_mode"]) for r in recs}) or [("fp32", "n/a")]
    written = []
    for fname, (metric, label) in PLOTS.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
        for ax, (prec, mode) in zip(axes[0], panels):
            sel = [r for r in recs if r["precision"] == prec and (r.get("power_mode_recorded") or r["power_mode"]) == mode]
            lines: dict[str, list[tuple[float, float, str]]] = {}
            for r in sel:
                if r.get(metric) is None or r.get("params") is None:
                    continue
                key = f"{r['backend']} b{r['batch']} p{r['prompt']} n{r['new_tokens']}"
                lines.setdefault(key, []).append((float(r["params"]), float(r[metric]), r["model"]))
            for key, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
            if not lines:
                reason = next((r.get("power_reason") for r in sel if r.get("power_reason")), None)
                ax.text(0.5, 0.5, f"no {label}\n" + (reason or "no finished cells"), ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, wrap=True)
            else:
                ax.set_xscale("log")
                ax.legend(fontsize=6)
            ax.set_xlabel("parameters")
            ax.set_ylabel(label)
            ax.set_title(f"{prec}, power mode {mode}", fontsize=9)
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        target = out / fname
        with atomic_path(target, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(target)
    return written
