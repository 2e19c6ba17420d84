"""Export a PyTorch model to ONNX with stable input/output names, written atomically.

    export(model, example_inputs, "model.onnx")                       # dynamo, opset 18
    export(model, example_inputs, "model.onnx", exporter="torchscript")  # opset 17

Default exporter: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``). It is the exporter PyTorch
maintains (the TorchScript exporter is deprecated and its default was switched off in torch 2.9),
it emits opset 18 with ONNX-script optimisation, and on our graphs every shape but the batch is a
constant (sequence length, heads, head size), which is what surgery and TensorRT want. The
TorchScript exporter stays available while torch ships it: its graphs compute the sequence length
from ``Shape`` (fold with ``polygraphy surgeon sanitize --fold-constants``) and GPT-NeoX needs an
explicit ``attention_mask`` (``example_inputs`` of every adapter provides one).

Names: a tensor input is ``pixel_values`` (floating) or ``input_ids`` (integer); a dict input keeps
its keys (``input_ids``, ``attention_mask``, ...). The single output is ``logits`` (classifiers and
language models; HF ``ModelOutput.logits``) or ``last_hidden_state`` (encoders without a head).
The batch axis is dynamic (``batch``) unless ``dynamic_batch=False``; every other axis is static.

The file records ``producer_name = "heart-onnx"``, ``producer_version``, and ``metadata_props``
``heart_onnx.exporter`` (``dynamo``/``torchscript``), ``heart_onnx.opset``, ``heart_onnx.torch``,
``heart_onnx.fingerprint`` (see :mod:`heart_onnx.models.fingerprint`), ``heart_onnx.inputs``,
``heart_onnx.outputs``. Models over 2 GB of weights are saved with one external data file
``<name>.data`` beside the ``.onnx``; both files are built in a temporary directory beside the
target and moved into place by atomic renames (data first), so an interrupted export never leaves
a partial or mismatched pair.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from ..errors import HeartError
from ..fileio import check_output_path
from .fingerprint import fingerprint

Exporter = Literal["dynamo", "torchscript"]
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = {"dynamo": 18, "torchscript": 17}
EXTERNAL_DATA_BYTES = 2_000_000_000  # protobuf's hard limit is 2 GiB; stay clearly below it
OUTPUT_LOGITS = "logits"
OUTPUT_HIDDEN = "last_hidden_state"


class _Wrapped(nn.Module):
    """Positional inputs in ``names`` order -> the model's main output tensor (logits or hidden state)."""

    def __init__(self, model: nn.Module, names: Sequence[str], as_kwargs: bool, hf: bool):
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.as_kwargs = as_kwargs
        self.hf = hf

    def raw(self, *args: torch.Tensor) -> Any:
        """The model's own output (a tensor, tuple or HF ``ModelOutput``); HF models without KV cache."""
        if self.as_kwargs:
            kw = dict(zip(self.names, args))
            if self.hf:
                kw.setdefault("return_dict", True)
                if _accepts(self.model, "use_cache"):
                    kw["use_cache"] = False
            return self.model(**kw)
        return self.model(*args)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return main_output(self.raw(*args))


def _accepts(model: nn.Module, arg: str) -> bool:
    import inspect

    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def main_output(out: Any) -> torch.Tensor:
    """The tensor heart-onnx treats as the model's output: ``logits``, else ``last_hidden_state``, else the first."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise HeartError(f"cannot find the output tensor of this model (got {type(out).__name__}): "
                     "wrap the model so that forward returns one tensor")


def _output_name(out: Any) -> str:
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return OUTPUT_LOGITS
    if isinstance(getattr(out, "last_hidden_state", None), torch.Tensor):
        return OUTPUT_HIDDEN
    return OUTPUT_LOGITS


def input_names_for(example_inputs: Any) -> list[str]:
    """The ONNX input names ``export`` gives these example inputs."""
    if isinstance(example_inputs, Mapping):
        return [str(k) for k in example_inputs]
    if isinstance(example_inputs, torch.Tensor):
        return ["input_ids" if not example_inputs.is_floating_point() else "pixel_values"]
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 1:
            return input_names_for(example_inputs[0])
        return [f"input_{i}" for i in range(len(example_inputs))]
    raise HeartError(f"example_inputs must be a tensor, a tuple of tensors or a dict of tensors, not {type(example_inputs).__name__}")


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, Mapping):
        vals = tuple(example_inputs.values())
    elif isinstance(example_inputs, torch.Tensor):
        vals = (example_inputs,)
    else:
        vals = tuple(example_inputs)
    for v in vals:
        if not isinstance(v, torch.Tensor):
            raise HeartError(f"every example input must be a torch.Tensor (got {type(v).__name__})")
    return vals


def _param_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        n += t.numel() * t.element_size()
    return n


def _is_hf(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    exporter: Exporter = "dynamo",
    opset: int | None = None,
    dynamic_batch: bool = True,
    external_data: bool | None = None,
) -> Path:
    """Export ``model`` (an ``nn.Module`` or a ``ModelAdapter``) to ``path`` and return the path.

    - ``example_inputs``: a tensor, a tuple of tensors, or a dict (HF models: ``input_ids``,
      ``attention_mask``, ...); the adapters' ``example_inputs(batch, seq_len)`` give the right ones.
    - ``exporter``: ``"dynamo"`` (default) or ``"torchscript"``.
    - ``opset``: default 18 for dynamo, 17 for TorchScript.
    - ``dynamic_batch``: default True, axis 0 of every input and of the output is ``batch``.
      An example batch of 1 is repeated to 2 for tracing (torch.export specialises size-1 dims).
    - ``external_data``: default None = automatic (weights over 2 GB); True/False forces it.
    The model is exported in eval mode (its training flag is restored afterwards).
    """
    from .base import ModelAdapter

    if isinstance(model, ModelAdapter):
        model = model.model
    if exporter not in EXPORTERS:
        raise HeartError(f"unknown exporter {exporter!r}: use one of {', '.join(EXPORTERS)}")
    if not isinstance(model, nn.Module):
        raise HeartError(f"export needs a torch.nn.Module, not {type(model).__name__}")
    opset = int(opset if opset is not None else DEFAULT_OPSET[exporter])
    target = check_output_path(path)
    if target.suffix != ".onnx":
        raise HeartError(f"output {target} must end in .onnx")
    names = input_names_for(example_inputs)
    args = _as_tuple(example_inputs)
    if dynamic_batch and args and args[0].shape[0] == 1:
        args = tuple(a.expand(2, *a.shape[1:]).clone() for a in args)
    as_kwargs = isinstance(example_inputs, Mapping)
    hf = _is_hf(model)
    wrapped = _Wrapped(model, names, as_kwargs, hf)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probe = wrapped.raw(*args)
        out_name = _output_name(probe)
        if external_data is None:
            external_data = _param_bytes(model) > EXTERNAL_DATA_BYTES
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            built = tmpdir / target.name
            if exporter == "dynamo":
                _export_dynamo(wrapped, args, names, out_name, built, opset, dynamic_batch, external_data, model)
            else:
                _export_torchscript(wrapped, args, names, out_name, built, opset, dynamic_batch, external_data, model)
            data_name = target.name + ".data"
            data = tmpdir / data_name
            if data.exists():
                os.replace(data, target.parent / data_name)
            elif (target.parent / data_name).exists():
                (target.parent / data_name).unlink()  # stale data from an earlier export of the same name
            os.replace(built, target)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    finally:
        model.train(was_training)
    return target


def _metadata(model: nn.Module, exporter: str, opset: int, names: Sequence[str], out_name: str) -> dict[str, str]:
    from .. import __version__

    return {
        "heart_onnx.exporter": exporter,
        "heart_onnx.opset": str(opset),
        "heart_onnx.torch": torch.__version__,
        "heart_onnx.version": __version__,
        "heart_onnx.fingerprint": fingerprint(model),
        "heart_onnx.inputs": ",".join(names),
        "heart_onnx.outputs": out_name,
    }


def _export_dynamo(wrapped, args, names, out_name, built: Path, opset, dynamic_batch, external_data, model) -> None:
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = (tuple({0: batch} for _ in args),)  # forward(*args): one entry holding the tuple
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(
                wrapped, args, dynamo=True, opset_version=opset, input_names=list(names), output_names=[out_name],
                dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
            )
        except Exception as exc:  # torch.export / onnxscript failures are long; keep the first line
            raise HeartError(f"dynamo export failed ({_first_line(exc)}): "
                             "try exporter='torchscript'") from exc
    from .. import __version__

    ir_model = prog.model
    ir_model.producer_name = "heart-onnx"
    ir_model.producer_version = f"{__version__} (torch {torch.__version__}, dynamo)"
    for k, v in _metadata(model, "dynamo", opset, names, out_name).items():
        ir_model.metadata_props[k] = v
    if external_data:
        # onnxscript names the data file after the destination: <name>.data
        prog.save(built, external_data=True)
    else:
        prog.save(built, external_data=False)


def _export_torchscript(wrapped, args, names, out_name, built: Path, opset, dynamic_batch, external_data, model) -> None:
    import onnx

    axes = {n: {0: "batch"} for n in names}
    axes[out_name] = {0: "batch"}
    raw = built.with_name("raw") / built.name
    raw.parent.mkdir()
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapped, args, str(raw), dynamo=False, opset_version=opset, input_names=list(names),
                output_names=[out_name], dynamic_axes=axes if dynamic_batch else None, do_constant_folding=True,
            )
        except Exception as exc:
            why = _first_line(exc)
            if "aten::diff" in why and "attention_mask" not in names:
                raise HeartError("the TorchScript exporter needs an explicit attention_mask for this model (HF builds "
                                 "its causal mask with aten::diff otherwise): pass {'input_ids': ..., 'attention_mask': "
                                 "...} (adapter.example_inputs gives both) or use exporter='dynamo'") from exc
            raise HeartError(f"torchscript export failed ({why}): try exporter='dynamo'") from exc
    from .. import __version__

    proto = onnx.load(str(raw), load_external_data=True)
    proto.producer_name = "heart-onnx"
    proto.producer_version = f"{__version__} (torch {torch.__version__}, torchscript)"
    meta = _metadata(model, "torchscript", opset, names, out_name)
    keep = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    if external_data:
        onnx.save_model(proto, str(built), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=built.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(built))
    shutil.rmtree(raw.parent, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    """The innermost cause's first line (torch.onnx wraps the real error in several pages of advice)."""
    import re

    while exc.__cause__ is not None:
        exc = exc.__cause__
    s = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {s[0][:300]}" if s else type(exc).__name__


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' Python-level prints ("[torch.onnx] Obtain model graph ...", graph dumps on failure)."""
    import io
    import sys

    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old_out, old_err


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """``metadata_props`` of an ONNX file (external data not loaded)."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise HeartError(f"ONNX file {p} does not exist")
    m = onnx.load(str(p), load_external_data=False)
    return {e.key: e.value for e in m.metadata_props}
