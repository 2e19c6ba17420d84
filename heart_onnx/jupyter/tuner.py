"""``BudgetTuner``: an ipywidgets panel to tune the loss budget live.

    tuner = BudgetTuner(sens, model=model, heldout=(x_test, y_test), images=x_test[:4])
    tuner            # in a notebook: slider, toggles, Pareto plot, head heat map, kept tokens
    tuner.plan       # the current Plan

Predicted values come from the greedy Pareto curve computed once per target selection
(``heart_onnx.budget.pareto``); moving the slider only picks a point on it and redraws SVG strings,
well under 100 ms. Measured values (loss change, accuracy on held-out data), export and benchmark run
on demand, from buttons, with a progress bar and a result table.
"""
from __future__ import annotations

import math
import tempfile
import time
from html import escape
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._deps import require
from ..errors import HeartError
from ..plan import Plan
from . import svg

TARGETS = ("heads", "tokens", "pairs")


class BudgetTuner:
    """Interactive budget tuning. Options (defaults):

    ``sens`` Sensitivities (required); ``model`` the PyTorch model (None: no measuring, kept tokens
    or export); ``heldout`` ``(x, y)`` tensors for measured loss/accuracy (None); ``images`` a few
    inputs (B, C, H, W) to show kept tokens on (None: the first held-out inputs); ``budget`` initial
    nats (0.05); ``targets`` initially on (those the sensitivities have, pairs off); ``out_dir`` for
    exports (a temporary directory); ``onnx_path`` an existing dense export to prune (None: export
    ``model`` on first use).
    """

    def __init__(self, sens: Any, model: Any = None, heldout: tuple[Any, Any] | None = None, images: Any = None,
                 budget: float = 0.05, targets: Sequence[str] | None = None, out_dir: str | Path | None = None,
                 onnx_path: str | Path | None = None):
        self.sens = sens
        self.model = model
        self.heldout = heldout
        self.images = images if images is not None else (heldout[0][:4] if heldout is not None else None)
        self.out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="heart-onnx-tuner-"))
        self.onnx_path = Path(onnx_path) if onnx_path is not None else None
        available = [t for t in TARGETS if self._has(t)]
        if not available:
            raise HeartError("these sensitivities have no head, token or pair scores: run 'heart-onnx analyze' first")
        self._available = available
        on = [t for t in (targets or [t for t in available if t != "pairs"] or available) if t in available]
        self._curves: dict[tuple[str, ...], Any] = {}
        self._plan: Plan | None = None
        self.last_render_ms = 0.0
        self._build_widgets(budget, on)
        self._update()

    # ------------------------------------------------------------------ construction helpers
    def _has(self, target: str) -> bool:
        s = self.sens
        return {"heads": s.head is not None, "tokens": s.token_keep_curve is not None, "pairs": bool(s.pairs)}[target]

    @classmethod
    def from_demo(cls, n_calib: int = 64, **kw: Any) -> "BudgetTuner":
        """The embedded demo ViT on digits: analyse (cached next to the package's cache dir) and tune."""
        from ..data import load_data
        from ..models.demo import demo_vit, digits_split
        from ..sensitivity.api import analyze
        from ..sensitivities import Sensitivities

        from ..models.fingerprint import fingerprint

        model = demo_vit()
        _, _, x_test, y_test = digits_split()
        # keyed by the weights' fingerprint: new demo weights never reuse stale sensitivities
        cache = Path(tempfile.gettempdir()) / "heart-onnx-cache" / f"demo_vit.{fingerprint(model)[:16]}.{n_calib}.cal2.sens.npz"
        if cache.is_file():
            sens = Sensitivities.load(cache)
        else:
            from ..calibration import calibrate_on_data
            from ..data import concat_batches

            calib = load_data("digits", model, n=n_calib, batch_size=16, split="calib")
            sens = analyze(model, calib, targets=("heads", "tokens"))
            x_val = concat_batches(load_data("digits", model, batch_size=512, split="calib"))[0]  # all 300 val images
            calibrate_on_data(model, sens, x_val)  # predictions in measured nats
            sens.save(cache)
        return cls(sens, model=model, heldout=(x_test, y_test), **kw)

    @classmethod
    def for_onnx(cls, onnx_path: str | Path, sens_path: str | Path | None = None, **kw: Any) -> "BudgetTuner":
        """Tune an exported model from its sensitivities (``<stem>.sens.npz`` beside it by default)."""
        from ..sensitivities import Sensitivities

        onnx_path = Path(onnx_path)
        sens_path = Path(sens_path) if sens_path else onnx_path.with_suffix(".sens.npz")
        if not sens_path.is_file():
            raise HeartError(f"no sensitivities at {sens_path}: run 'heart-onnx analyze ... -o {sens_path.name}' on the "
                             "PyTorch model first")
        return cls(Sensitivities.load(sens_path), onnx_path=onnx_path, **kw)

    def _build_widgets(self, budget: float, on: Sequence[str]) -> None:
        w = require("ipywidgets", "the budget tuner")
        self.slider = w.FloatLogSlider(value=budget, base=10, min=-4, max=0, step=0.02, description="budget (nats)",
                                       continuous_update=True, readout_format=".4f",
                                       layout=w.Layout(width="480px"), style={"description_width": "initial"})
        self.toggles = {t: w.ToggleButton(value=t in on, description=t, disabled=t not in self._available,
                                          tooltip=f"prune {t}") for t in TARGETS}
        self.summary = w.HTML()
        self.pareto_view = w.HTML()
        self.heatmap_view = w.HTML()
        self.tokens_view = w.HTML()
        self.progress = w.IntProgress(value=0, min=0, max=1, description="", layout=w.Layout(width="300px"))
        self.results = w.HTML()
        self.measure_button = w.Button(description="Measure", tooltip="measured loss change and accuracy on held-out data",
                                       disabled=self.model is None or self.heldout is None)
        self.export_button = w.Button(description="Export pruned ONNX", disabled=self.model is None and self.onnx_path is None)
        self.bench_button = w.Button(description="Benchmark", disabled=self.model is None and self.onnx_path is None)
        self.slider.observe(lambda _: self._update(), names="value")
        for t in self.toggles.values():
            t.observe(lambda _: self._update(), names="value")
        self.measure_button.on_click(lambda _: self._safe(self.measure))
        self.export_button.on_click(lambda _: self._safe(self.export))
        self.bench_button.on_click(lambda _: self._safe(self.benchmark))
        self.widget = w.VBox([
            w.HBox([self.slider, *self.toggles.values()]),
            self.summary,
            w.HBox([self.pareto_view, self.heatmap_view]),
            self.tokens_view,
            w.HBox([self.measure_button, self.export_button, self.bench_button, self.progress]),
            self.results,
        ])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # ------------------------------------------------------------------ state
    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in TARGETS if self.toggles[t].value and t in self._available)

    @property
    def budget(self) -> float:
        return float(self.slider.value)

    @property
    def plan(self) -> Plan | None:
        """The plan for the current budget and targets (None when no target is on)."""
        return self._plan

    def curve(self) -> Any:
        """The Pareto curve for the current targets (computed once per selection, then cached)."""
        from ..budget import pareto

        key = self.targets
        if key not in self._curves:
            self._curves[key] = pareto(self.sens, list(key))
        return self._curves[key]

    def _update(self) -> None:
        t0 = time.perf_counter()
        if not self.targets:
            self._plan = None
            self.summary.value = "<i>switch on heads, tokens or pairs</i>"
            self.last_render_ms = (time.perf_counter() - t0) * 1e3
            return
        curve = self.curve()
        self._plan = curve.to_plan(self.budget)
        p = self._plan
        pred = p.predicted_loss_change or 0.0
        reduction = 1 - (p.flops_pruned or curve.flops_dense) / curve.flops_dense
        heads_removed = sum(len(v) for v in p.heads.values())
        stages = ", ".join(f"after L{s.after_layer}: {s.keep}" for s in p.tokens) or "all"
        merges = sum(len(m.pruned) for m in p.merges)
        self.summary.value = (
            f"<b>budget</b> {self.budget:.4g} nats &nbsp; <b>predicted loss change</b> "
            f"<span data-tuner='predicted'>{pred:.4g}</span> nats &nbsp; <b>FLOPs</b> "
            f"<span data-tuner='flops'>{(p.flops_pruned or 0) / 1e6:.2f}M</span> of {curve.flops_dense / 1e6:.2f}M "
            f"(<span data-tuner='reduction'>{100 * reduction:.1f}</span>% fewer)<br>"
            f"<b>heads removed</b> <span data-tuner='heads'>{heads_removed}</span> &nbsp; "
            f"<b>tokens kept</b> <span data-tuner='tokens'>{escape(stages)}</span>"
            + (f" &nbsp; <b>weights merged</b> {merges}" if merges else ""))
        self.pareto_view.value = svg.pareto_svg(curve.loss, curve.flops, (pred, p.flops_pruned or curve.flops_dense),
                                                curve.flops_dense)
        if self.sens.head is not None:
            self.heatmap_view.value = svg.heatmap_svg(self.sens.head, {int(k): v for k, v in p.heads.items()})
        self.tokens_view.value = self._tokens_html(p)
        self.last_render_ms = (time.perf_counter() - t0) * 1e3

    # ------------------------------------------------------------------ kept tokens over images
    def kept_tokens(self, plan: Plan) -> list[list[list[int]]]:
        """Per image, per token stage: the original patch indices (prefix excluded) still present after it.

        Recovered by matching rows: a kept token's hidden vector is gathered unchanged, so each row after
        a stage equals exactly one row before it (the fused token, if any, matches none and is skipped).
        """
        if self.model is None or self.images is None or not plan.tokens:
            return []
        import torch

        from ..models.masking import apply_plan
        from ..models.registry import adapt

        adapter = adapt(self.model)
        P = plan.prefix_tokens
        before: dict[int, torch.Tensor] = {}
        after: dict[int, torch.Tensor] = {}
        first = lambda o: o[0] if isinstance(o, (tuple, list)) else o  # noqa: E731
        handles = [adapter.block_module(s.after_layer).register_forward_hook(
            lambda m, i, o, l=s.after_layer: before.__setitem__(l, first(o).detach())) for s in plan.tokens]
        try:
            with torch.no_grad(), apply_plan(adapter, plan) as masked:
                handles += [masked.block_module(s.after_layer).register_forward_hook(
                    lambda m, i, o, l=s.after_layer: after.__setitem__(l, first(o).detach())) for s in plan.tokens]
                masked.forward(self.images)
        finally:
            for h in handles:
                h.remove()
        B = self.images.shape[0]
        origin = [list(range(-P, before[plan.tokens[0].after_layer].shape[1] - P)) for _ in range(B)]
        out: list[list[list[int]]] = [[] for _ in range(B)]
        for s in plan.tokens:
            x0, x1 = before[s.after_layer], after[s.after_layer]  # (B, N, D), (B, K[+1], D)
            for b in range(B):
                d = torch.cdist(x1[b].double(), x0[b].double())  # (K, N)
                match = [int(j) if d[i, j] == 0 else None for i, j in enumerate(d.argmin(-1).tolist())]
                origin[b] = [origin[b][j] if j is not None else -1 for j in match]
                out[b].append(sorted(o for o in origin[b] if o >= 0))
        return out

    def _tokens_html(self, plan: Plan) -> str:
        kept = self.kept_tokens(plan)
        if not kept:
            return ""
        imgs = np.asarray(self.images.detach().cpu())[:, 0]  # (B, H, W)
        geo = self.sens.meta.get("geometry", {})
        n_patches = int(geo.get("seq_len", 0)) - int(geo.get("prefix_tokens", 0))
        side = int(round(math.sqrt(n_patches)))
        rows = []
        for b, per_stage in enumerate(kept):
            cells = [svg.tokens_svg(imgs[b], (side, side), None, "input")]
            for stage, idx in zip(plan.tokens, per_stage):
                cells.append(svg.tokens_svg(imgs[b], (side, side), idx, f"after L{stage.after_layer}: {len(idx)}"))
            rows.append("<div style='display:flex;gap:8px'>" + "".join(cells) + "</div>")
        return "<div data-tuner='kept-tokens'>" + "".join(rows) + "</div>"

    # ------------------------------------------------------------------ on-demand actions
    def _safe(self, fn) -> None:
        try:
            fn()
        except HeartError as exc:
            self.results.value = f"<span style='color:#c00'>{escape(str(exc))}</span>"

    def _table(self, rows: list[tuple[str, Any]]) -> str:
        body = "".join(f"<tr><td style='text-align:left'>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in rows)
        return f"<table data-tuner='results'>{body}</table>"

    def _step(self, i: int, n: int, label: str) -> None:
        self.progress.max, self.progress.value, self.progress.description = n, i, label

    def measure(self) -> dict[str, float]:
        """Measured mean KL(dense || pruned) and accuracy, dense and pruned, on the held-out data."""
        if self.model is None or self.heldout is None or self._plan is None:
            raise HeartError("measuring needs the model, held-out data and at least one target switched on")
        import torch
        import torch.nn.functional as F

        from ..models.masking import apply_plan

        x, y = self.heldout
        self._step(0, 2, "dense")
        with torch.no_grad():
            dense = self.model(x)
            self._step(1, 2, "pruned")
            with apply_plan(self.model, self._plan) as masked:
                pruned = masked.forward(x)
        kl = F.kl_div(F.log_softmax(pruned, -1), F.log_softmax(dense, -1), log_target=True, reduction="batchmean")
        out = {"measured_loss_change": float(kl), "predicted_loss_change": float(self._plan.predicted_loss_change or 0.0),
               "accuracy_dense": float((dense.argmax(-1) == y).float().mean()),
               "accuracy_pruned": float((pruned.argmax(-1) == y).float().mean())}
        self._step(2, 2, "done")
        self.results.value = self._table(list(out.items()))
        return out

    def _dense_onnx(self) -> Path:
        if self.onnx_path is None:
            import torch

            from ..models.export import export

            x = self.images[:1] if self.images is not None else None
            if x is None:
                raise HeartError("exporting needs example inputs: pass images= or heldout=")
            self.onnx_path = export(self.model, torch.as_tensor(x), self.out_dir / "dense.onnx")
        return self.onnx_path

    def export(self, path: str | Path | None = None) -> Path:
        """Write the pruned ONNX model for the current plan (dense export first if needed)."""
        if self._plan is None:
            raise HeartError("switch on at least one target before exporting")
        from ..surgery.api import prune

        self._step(0, 2, "export")
        dense = self._dense_onnx()
        self._step(1, 2, "prune")
        out = Path(path) if path is not None else self.out_dir / f"pruned-{self.budget:.4g}.onnx"
        prune(dense, self._plan, out)
        self._step(2, 2, "done")
        self.last_export = out
        self.results.value = self._table([("pruned ONNX", str(out)), ("size (MB)", f"{out.stat().st_size / 1e6:.2f}")])
        return out

    def benchmark(self, batch: int = 1) -> dict[str, Any]:
        """Latency of the dense and pruned ONNX models on ONNX Runtime CPU, measured side by side."""
        from ..runtime.api import benchmark as bench

        pruned = self.export()
        self._step(0, 2, "dense")
        d = bench(str(self._dense_onnx()), backend="ort-cpu", batch=batch)
        self._step(1, 2, "pruned")
        p = bench(str(pruned), backend="ort-cpu", batch=batch)
        self._step(2, 2, "done")
        dm, pm = _median_ms(d), _median_ms(p)
        out = {"dense_median_ms": dm, "pruned_median_ms": pm, "speedup": dm / pm if pm else float("nan")}
        self.results.value = self._table([(k, f"{v:.3f}") for k, v in out.items()])
        return out


def _median_ms(result: Any) -> float:
    for attr in ("median_ms", "latency_ms_median"):
        if hasattr(result, attr):
            return float(getattr(result, attr))
    if isinstance(result, dict):
        return float(result.get("median_ms", result.get("latency_ms", {}).get("median")))
    return float(result.latency_ms["median"])
