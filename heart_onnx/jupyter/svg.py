"""Small SVG renderers for the tuner: a Pareto curve, a layer x head heat map, kept tokens over images.

Plain strings, no plotting library: a re-render costs well under a millisecond, so the widgets follow
a slider. Every element carries ``data-*`` attributes so tests (and browsers) can read what is drawn.
"""
from __future__ import annotations

import math
from html import escape
from typing import Sequence

import numpy as np


def _scale(v: float, lo: float, hi: float, a: float, b: float) -> float:
    if hi <= lo:
        return (a + b) / 2
    return a + (v - lo) / (hi - lo) * (b - a)


def pareto_svg(loss: Sequence[float], flops: Sequence[float], current: tuple[float, float] | None,
               dense_flops: float, width: int = 420, height: int = 260) -> str:
    """Predicted loss change (x, log) against FLOPs as % of dense (y), with the current plan marked."""
    loss = np.asarray(loss, dtype=float)
    flops = np.asarray(flops, dtype=float) / max(dense_flops, 1e-30) * 100
    pad_l, pad_r, pad_t, pad_b = 48, 12, 12, 36
    x_lo, x_hi = math.log10(1e-4), math.log10(max(1.0, float(np.nanmax(loss)) if loss.size else 1.0))
    y_lo, y_hi = 0.0, 100.0

    def xy(l: float, f: float) -> tuple[float, float]:
        x = _scale(math.log10(max(l, 1e-4)), x_lo, x_hi, pad_l, width - pad_r)
        y = _scale(f, y_lo, y_hi, height - pad_b, pad_t)
        return x, y

    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(l, f) for l, f in zip(loss, flops)))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" data-plot="pareto" '
             f'data-points="{len(loss)}">',
             f'<rect x="{pad_l}" y="{pad_t}" width="{width - pad_l - pad_r}" height="{height - pad_t - pad_b}" '
             'fill="none" stroke="#999"/>']
    for f in (25, 50, 75, 100):
        _, y = xy(1e-4, f)
        parts.append(f'<text x="{pad_l - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{f}%</text>')
    for e in range(int(math.ceil(x_lo)), int(math.floor(x_hi)) + 1):
        x, _ = xy(10 ** e, 0)
        parts.append(f'<text x="{x:.1f}" y="{height - pad_b + 14}" font-size="10" text-anchor="middle">1e{e}</text>')
    parts.append(f'<text x="{(pad_l + width - pad_r) / 2}" y="{height - 4}" font-size="11" text-anchor="middle">'
                 'predicted loss change (nats)</text>')
    parts.append(f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
    if current is not None:
        cl, cf = current
        x, y = xy(cl, cf / max(dense_flops, 1e-30) * 100)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#d62728" data-current-loss="{cl:.6g}" '
                     f'data-current-flops="{cf:.6g}"/>')
    parts.append("</svg>")
    return "".join(parts)


def heatmap_svg(scores: np.ndarray, removed: dict[int, Sequence[int]], cell: int = 22) -> str:
    """Layer (rows) x head (columns) of head sensitivities, log colour scale; removed heads crossed out."""
    L, H = scores.shape
    s = np.log10(np.clip(np.asarray(scores, dtype=float), 1e-8, None))
    lo, hi = float(np.nanmin(s)), float(np.nanmax(s))
    left, top = 34, 16
    w, h = left + H * cell + 4, top + L * cell + 4
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" data-plot="heatmap" '
             f'data-removed="{sum(len(v) for v in removed.values())}">']
    for hd in range(H):
        parts.append(f'<text x="{left + hd * cell + cell / 2}" y="11" font-size="9" text-anchor="middle">h{hd}</text>')
    for l in range(L):
        parts.append(f'<text x="{left - 4}" y="{top + l * cell + cell / 2 + 3}" font-size="9" text-anchor="end">L{l}</text>')
        gone = set(int(x) for x in removed.get(l, ()))
        for hd in range(H):
            t = _scale(float(s[l, hd]), lo, hi, 0.0, 1.0) if np.isfinite(s[l, hd]) else 0.0
            r, g, b = int(255 * t), int(80 + 100 * (1 - t)), int(255 * (1 - t))
            x, y = left + hd * cell, top + l * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" fill="rgb({r},{g},{b})" '
                         f'data-layer="{l}" data-head="{hd}" data-removed="{int(hd in gone)}">'
                         f'<title>layer {l} head {hd}: {scores[l, hd]:.3g} nats</title></rect>')
            if hd in gone:
                parts.append(f'<path d="M{x + 3},{y + 3} L{x + cell - 4},{y + cell - 4} M{x + cell - 4},{y + 3} '
                             f'L{x + 3},{y + cell - 4}" stroke="white" stroke-width="2"/>')
    parts.append("</svg>")
    return "".join(parts)


def tokens_svg(image: np.ndarray, grid: tuple[int, int], kept: Sequence[int] | None, label: str, px: int = 12) -> str:
    """One image (H, W) in grey with the patches that were dropped dimmed in red.

    ``kept``: indices of kept patches (0-based over the grid, prefix tokens excluded); None = all kept.
    """
    img = np.asarray(image, dtype=float)
    img = (img - img.min()) / max(img.max() - img.min(), 1e-12)
    Hh, Ww = img.shape
    gh, gw = grid
    ph, pw = Hh // gh, Ww // gw
    kept_set = set(range(gh * gw)) if kept is None else set(int(k) for k in kept)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{Ww * px}" height="{Hh * px + 14}" data-plot="tokens" '
             f'data-kept="{len(kept_set)}">']
    for i in range(Hh):
        for j in range(Ww):
            v = int(255 * img[i, j])
            parts.append(f'<rect x="{j * px}" y="{i * px}" width="{px}" height="{px}" fill="rgb({v},{v},{v})"/>')
    for p in range(gh * gw):
        if p not in kept_set:
            r, c = divmod(p, gw)
            parts.append(f'<rect x="{c * pw * px}" y="{r * ph * px}" width="{pw * px}" height="{ph * px}" '
                         f'fill="rgba(214,39,40,0.55)" data-dropped="{p}"/>')
    parts.append(f'<text x="0" y="{Hh * px + 11}" font-size="10">{escape(label)}</text></svg>')
    return "".join(parts)
