"""Tiny models exported once per test session (shared by test_match.py and test_inspect.py).

Dynamo exports cost tens of seconds on a loaded 2-core machine, so each (family, exporter) pair is
exported at most once per pytest process; every test still draws fresh random inputs.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

_CACHE: dict[tuple[str, str], tuple[Any, Any, Path]] = {}
_DIR = Path(tempfile.mkdtemp(prefix="heart-onnx-test-models-"))

# family -> (zoo builder, expected layers, heads, head_dim, seq_len, layout, norm)
FAMILIES = {
    "timm_vit": ("tiny_vit", 2, 4, 8, 17, "fused_timm", "pre"),
    "timm_deit": ("tiny_deit", 2, 4, 8, 18, "fused_timm", "pre"),
    "hf_vit": ("tiny_hf_vit", 2, 4, 8, 17, "separate", "pre"),
    "hf_deit": ("tiny_hf_deit", 2, 4, 8, 18, "separate", "pre"),
    "pythia": ("tiny_pythia", 2, 4, 8, 16, "neox_interleaved", "parallel"),
    "bert": ("tiny_bert", 2, 4, 8, 16, "separate", "post"),
}


def exported(family: str, exporter: str) -> tuple[Any, Any, Path]:
    """(torch model, adapter, path of the exported .onnx) for a tiny model of ``family``."""
    key = (family, exporter)
    if key not in _CACHE:
        import torch

        from heart_onnx.models import zoo
        from heart_onnx.models.export import export
        from heart_onnx.models.registry import adapt

        torch.manual_seed(1234)
        model = getattr(zoo, FAMILIES[family][0])().eval()
        adapter = adapt(model)
        path = _DIR / f"{family}_{exporter}.onnx"
        export(model, adapter.example_inputs(), path, exporter=exporter)
        _CACHE[key] = (model, adapter, path)
    return _CACHE[key]


def ort_inputs(adapter: Any, batch: int = 2) -> tuple[Any, dict[str, Any]]:
    """Fresh random example inputs: (for torch, for onnxruntime by input name)."""
    from heart_onnx.models.export import input_names_for

    ex = adapter.example_inputs(batch=batch)
    names = input_names_for(ex)
    if isinstance(ex, dict):
        feeds = {k: v.numpy() for k, v in ex.items()}
    else:
        feeds = {names[0]: ex.numpy()}
    return ex, feeds
