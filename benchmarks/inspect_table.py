"""Params / FLOPs / heads table of the reference models, as ``heart-onnx inspect`` reports them.

Protocol: each model is built with random init (no downloads; the demo ViT with its shipped weights
when present), exported with ``heart_onnx.models.export.export`` (default exporter dynamo, dynamic
batch), then ``heart_onnx.inspect.inspect`` runs on the file with the batch pinned to 1. Reported per
model: PyTorch parameter count, ONNX parameter count (unique float initializers), MACs (1 MAC = 2
FLOPs), attention-matmul MACs, elementwise FLOPs (1 per output element), total FLOPs, the attention
table (layers, heads, head_dim, seq_len, layout), the analytic ViT MAC count where it applies, and the
export and inspect wall times (single process, OMP_NUM_THREADS as set by the caller). Models: ViT-B/16
and DeiT-B/16 at 224x224 (timm), Pythia-70m at sequence length 128 (HF GPT-NeoX), the demo ViT.

    python benchmarks/inspect_table.py [artifacts/inspect_table.json] [--exporter dynamo|torchscript]
                                       [--only vit_b_16,deit_b_16,pythia_70m,demo_vit]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _vit_macs(n_tok: int, d: int, depth: int, mlp: int, patches: int, patch_in: int, classes: int) -> int:
    block = n_tok * d * 3 * d + 2 * n_tok * n_tok * d + n_tok * d * d + 2 * n_tok * d * mlp
    return patches * d * patch_in + depth * block + d * classes


def _build(name: str) -> tuple[Any, Any, int | None]:
    """(model, example inputs, analytic MACs or None)."""
    from heart_onnx.models import zoo
    from heart_onnx.models.registry import adapt

    if name == "vit_b_16":
        m = zoo.vit_b_16()
        return m, adapt(m).example_inputs(), _vit_macs(197, 768, 12, 3072, 196, 768, 1000)
    if name == "deit_b_16":
        m = zoo.deit_b_16()
        return m, adapt(m).example_inputs(), _vit_macs(197, 768, 12, 3072, 196, 768, 1000)
    if name == "pythia_70m":
        m = zoo.pythia("70m")
        a = adapt(m)
        return m, a.example_inputs(seq_len=128), None
    if name == "demo_vit":
        from heart_onnx.models.demo import demo_vit

        try:
            m = demo_vit(pretrained=True)
        except Exception:  # noqa: BLE001 - shipped weights missing: random init has the same geometry
            m = demo_vit(pretrained=False)
        return m, adapt(m).example_inputs(), None
    raise SystemExit(f"unknown model {name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", nargs="?", default="artifacts/inspect_table.json")
    ap.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    ap.add_argument("--only", default="vit_b_16,deit_b_16,pythia_70m,demo_vit")
    args = ap.parse_args(argv)

    import onnx
    import torch

    from heart_onnx import __version__
    from heart_onnx.inspect import inspect
    from heart_onnx.models.export import export

    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            model, inputs, analytic = _build(name)
            path = Path(tmp) / f"{name}.onnx"
            t0 = time.perf_counter()
            export(model, inputs, path, exporter=args.exporter)
            t1 = time.perf_counter()
            info = inspect(path)
            t2 = time.perf_counter()
            att = info["attention"]
            row = {
                "model": name, "exporter": args.exporter,
                "params_torch": sum(p.numel() for p in model.parameters()), "params_onnx": info["params"],
                "macs": info["macs"], "gmacs": round(info["macs"] / 1e9, 4), "attention_macs": info["attention_macs"],
                "elementwise_flops": info["flops"]["elementwise"], "flops": info["flops"]["total"],
                "gflops": round(info["flops"]["total"] / 1e9, 4),
                "analytic_macs": analytic,
                "macs_vs_analytic": None if analytic is None else round(info["macs"] / analytic - 1, 6),
                "layers": len(att), "heads": sorted({a["heads"] for a in att}),
                "head_dim": sorted({a["head_dim"] for a in att}), "seq_len": sorted({a["seq_len"] or 0 for a in att}),
                "layout": sorted({a["layout"] for a in att}), "inputs": info["inputs"],
                "assumptions": info["flops"]["assumptions"], "unknown": info["flops"]["unknown"],
                "export_s": round(t1 - t0, 2), "inspect_s": round(t2 - t1, 2),
            }
            rows.append(row)
            print(f"{name:<11} params {row['params_torch'] / 1e6:8.2f}M (onnx {row['params_onnx'] / 1e6:8.2f}M)  "
                  f"{row['gmacs']:8.3f} GMACs  {row['gflops']:8.3f} GFLOPs  layers {row['layers']:>2} heads {row['heads']} "
                  f"head_dim {row['head_dim']} seq {row['seq_len']}  inspect {row['inspect_s']}s", flush=True)
            del model
    out = {
        "protocol": "random-init models exported with heart_onnx.models.export (dynamic batch, pinned to 1 for "
                    "FLOPs); 1 MAC = 2 FLOPs; elementwise ops 1 FLOP per output element",
        "versions": {"heart_onnx": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "python": sys.version.split()[0], "platform": platform.platform()},
        "rows": rows,
    }
    p = Path(args.output)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=1))
    print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
