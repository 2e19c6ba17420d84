"""``verify(pruned.onnx, model, plan)``: the invariant, checked on fresh random inputs.

The pruned ONNX graph (ONNX Runtime, CPU) is compared with the PyTorch model with the same plan
applied by masking (:func:`heart_onnx.models.masking.apply_plan`), on ``n`` random input batches for
each batch size. Pass: ``max |onnx - ref| <= rtol_scale * scale + 1e-6`` with ``scale = max |ref|``
(the output scale), polygraphy-style. The result is truthy on pass and reports max/mean absolute and
relative error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ._deps import require
from .errors import HeartError
from .plan import Plan

ATOL_FLOOR = 1e-6


@dataclass
class CompareResult:
    """Outcome of a comparison: truthy when ``max_abs <= tol``."""

    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    scale: float  # max |reference|
    tol: float
    runs: int
    batch_sizes: tuple[int, ...]
    details: list = field(default_factory=list)  # per run: batch, max_abs, scale

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.tol

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "max_abs": self.max_abs, "mean_abs": self.mean_abs, "max_rel": self.max_rel,
                "mean_rel": self.mean_rel, "scale": self.scale, "tol": self.tol, "runs": self.runs,
                "batch_sizes": list(self.batch_sizes), "details": self.details}

    def __str__(self) -> str:
        word = "PASSED" if self.passed else "FAILED"
        return (f"{word}: max abs {self.max_abs:.3g} (tol {self.tol:.3g} = scale {self.scale:.3g} x rtol), "
                f"mean abs {self.mean_abs:.3g}, max rel {self.max_rel:.3g} over {self.runs} runs, batch {list(self.batch_sizes)}")


def _feed(sess: Any, inputs: Any) -> dict[str, np.ndarray]:
    import torch

    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, dict):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise HeartError(f"the ONNX model needs inputs {missing} that the PyTorch inputs do not have")
        return {n: inputs[n].detach().cpu().numpy() for n in names}
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if len(inputs) != len(names):
        raise HeartError(f"the ONNX model has {len(names)} inputs ({names}), got {len(inputs)} tensors")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}


def _batch_of(inputs: Any) -> int:
    import torch

    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()))
    if isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    return int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) else 0


def verify(onnx_path: str | os.PathLike, model: Any, plan: Plan, inputs: Sequence[Any] | Any | None = None, n: int = 4,
           batch_sizes: Sequence[int] = (1, 8), rtol_scale: float = 1e-4, check: bool = True) -> CompareResult:
    """Compare the pruned ONNX model with ``model`` (nn.Module or adapter) masked by ``plan``.

    ``inputs`` (default None): a list of input batches (or one batch); None draws ``n`` (default 4)
    random batches per size in ``batch_sizes`` (default (1, 8)) from ``adapter.example_inputs``.
    ``rtol_scale`` (default 1e-4): tolerance as a fraction of the output scale. ``check`` (default
    True): verify the plan's fingerprint against the model.
    """
    torch = require("torch", "verify")
    ort = require("onnxruntime", "verify")
    from .models.masking import _adapter, apply_plan

    adapter = _adapter(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        so.intra_op_num_threads = int(threads)
    if not os.path.isfile(os.fspath(onnx_path)):
        raise HeartError(f"{onnx_path} does not exist: give the path of the pruned .onnx file")
    sess = ort.InferenceSession(os.fspath(onnx_path), so, providers=["CPUExecutionProvider"])
    if inputs is None:
        batches = [adapter.example_inputs(b) for b in batch_sizes for _ in range(n)]
    elif isinstance(inputs, (list, tuple)) and inputs and not isinstance(inputs[0], torch.Tensor):
        batches = list(inputs)
    else:
        batches = [inputs]
    was = adapter.model.training
    adapter.model.eval()
    abs_max = abs_sum = rel_max = rel_sum = 0.0
    count = 0
    scale = 0.0
    details = []
    try:
        with torch.no_grad(), apply_plan(adapter, plan, check=check):
            for x in batches:
                ref = adapter.forward(x).float().cpu().numpy()
                got = sess.run(None, _feed(sess, x))[0]
                if got.shape != ref.shape:
                    raise HeartError(f"output shapes differ: ONNX {got.shape}, PyTorch {ref.shape}: "
                                     "was the ONNX file pruned with this plan?")
                d = np.abs(got.astype(np.float64) - ref)
                r = d / (np.abs(ref) + 1e-12)
                s = float(np.abs(ref).max())
                scale = max(scale, s)
                abs_max, rel_max = max(abs_max, float(d.max())), max(rel_max, float(r.max()))
                abs_sum, rel_sum, count = abs_sum + float(d.sum()), rel_sum + float(r.sum()), count + d.size
                details.append({"batch": _batch_of(x), "max_abs": float(d.max()), "scale": s})
    finally:
        adapter.model.train(was)
    return CompareResult(abs_max, abs_sum / max(count, 1), rel_max, rel_sum / max(count, 1), scale,
                         rtol_scale * scale + ATOL_FLOOR, len(batches),
                         tuple(sorted({d["batch"] for d in details})), details)
