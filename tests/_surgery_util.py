"""Shared helpers of the surgery tests: tiny models with non-trivial biases, exports cached per session."""
from __future__ import annotations

import numpy as np
import torch

from heart_onnx.models import zoo
from heart_onnx.models.export import export
from heart_onnx.models.fingerprint import fingerprint
from heart_onnx.models.registry import adapt
from heart_onnx.plan import Plan, TokenStage

BUILD = {
    "timm_vit": lambda: zoo.tiny_vit(depth=3),
    "timm_deit": lambda: zoo.tiny_deit(depth=3),
    "hf_vit": lambda: zoo.tiny_hf_vit(layers=3),
    "hf_deit": lambda: zoo.tiny_hf_deit(layers=3),
    "bert": lambda: zoo.tiny_bert(layers=3),
    "pythia": lambda: zoo.tiny_pythia(layers=3),
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    m = BUILD[name]()
    with torch.no_grad():  # random biases / norms: no de-duplicated constants hide a wrong slice
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval(), adapt(m)


def exported(tmp_factory, cache: dict, name: str, exporter: str):
    key = (name, exporter)
    if key not in cache:
        m, a = make(name)
        path = tmp_factory.mktemp(f"{name}_{exporter}") / "m.onnx"
        export(m, a.example_inputs(2), path, exporter=exporter)
        cache[key] = (m, a, path)
    return cache[key]


def plan_for(m, a, heads=None, stages=(), scorer="cls_attention", fuse=False, seed=1) -> Plan:
    rng = np.random.default_rng(seed)
    D = a.hidden_size
    scorers = {l: (tuple(rng.standard_normal(D).tolist()), 0.1) for l, _ in stages} if scorer == "linear" else {}
    return Plan(fingerprint=fingerprint(m), family=a.family, geometry=a.geometry(), heads=heads or {},
                tokens=tuple(TokenStage(l, k) for l, k in stages), token_scorer=scorer, scorers=scorers,
                fuse_dropped=fuse, prefix_tokens=a.prefix_tokens)
