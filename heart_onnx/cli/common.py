"""Argument conventions shared by every subcommand, and the loaders behind the shared options.

Options shared by several commands, each added by one function here so the name, metavar, default
and help text are the same everywhere:

- ``add_model_flags``: ``--model NAME|PATH``, ``--weights PATH``, ``--family NAME``; read back with
  :func:`load_model_from_args` (``analyze``, ``verify``, ``finetune``);
- ``add_data_flags``: ``--data SPEC``, ``-n/--samples N``, ``--batch-size B``, ``--seq-len T``
  (``analyze``, ``finetune``);
- ``add_plan_flag`` (``--plan PLAN.json``), ``add_onnx_input`` (a positional ``MODEL.onnx``),
  ``add_output_flag`` (``-o/--output``), ``add_json_flag`` (``--json``);
- ``int_list`` / ``float_list``: comma-separated numbers -> list, a ``HeartError`` naming the option.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..errors import HeartError

DEMO_MODELS = ("demo-vit", "demo-cnn")
DATA_SPECS = "digits[:calib|train|test], folder:DIR, npz:FILE, text:FILE, random"


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout")


def add_output_flag(p: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    p.add_argument("-o", "--output", required=required, metavar="PATH", help=f"where to write {what} (written atomically)")


def add_onnx_input(p: argparse.ArgumentParser, dest: str = "model", help: str = "the ONNX file") -> None:
    """The positional ONNX input every graph command takes (``MODEL.onnx``)."""
    p.add_argument(dest, metavar="MODEL.onnx", help=help)


def add_plan_flag(p: argparse.ArgumentParser, help: str = "plan JSON from 'heart-onnx plan'") -> None:
    p.add_argument("--plan", required=True, metavar="PLAN.json", help=help)


def add_model_flags(p: argparse.ArgumentParser, *, required: bool = False, module_pickle: bool = False) -> None:
    """``--model NAME|PATH``, ``--weights PATH``, ``--family NAME`` (read with :func:`load_model_from_args`).

    ``required`` (default False): --model must be given; ``module_pickle`` (default False): the help
    says --weights alone may be a pickled ``nn.Module`` (``verify``, for models outside the zoo).
    """
    p.add_argument("--model", required=required, metavar="NAME|PATH",
                   help="demo-vit, demo-cnn, a zoo name (heart_onnx.models.zoo.names()) or a local model path "
                        "(save_pretrained folder or state-dict file)")
    alone = "a saved nn.Module (torch.save(model))" if module_pickle else "a state-dict file (family inferred or --family)"
    p.add_argument("--weights", default=None, metavar="PATH",
                   help=f"with --model: a state dict loaded into it; alone: {alone} (default: none)")
    p.add_argument("--family", default=None, metavar="NAME",
                   help="architecture of a local state-dict file: a zoo or timm name (default: inferred)")


def add_data_flags(p: argparse.ArgumentParser, *, default: str = "digits", what: str = "calibration",
                   batch_size: int = 32) -> None:
    """``--data SPEC``, ``-n/--samples N``, ``--batch-size B`` and ``--seq-len T``."""
    p.add_argument("--data", default=default, metavar="SPEC", help=f"{what} data spec (default {default}): {DATA_SPECS}")
    p.add_argument("-n", "--samples", type=int, default=None, help=f"{what} samples to use (default: all of the spec)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"{what} batch size (default {batch_size})")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for text data (default: the data module's)")


def _read_state_dict(path: str) -> dict:
    import torch

    if not os.path.isfile(path):
        raise HeartError(f"weights file {path} does not exist: give a file written by torch.save(model.state_dict(), path)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickled objects, truncated files, not a torch file
        raise HeartError(f"cannot read weights {path} ({type(exc).__name__}): "
                         "save them with torch.save(model.state_dict(), path)") from None
    if isinstance(sd, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict):
        raise HeartError(f"{path} holds a {type(sd).__name__}, not a state dict: save torch.save(model.state_dict(), path)")
    return sd


def load_named_model(name: str, weights: str | None = None, family: str | None = None):
    """``demo-vit``/``demo-cnn``, a zoo name or a local path (+ optional state-dict ``weights``) -> eval ``nn.Module``."""
    key = name.strip().lower()
    if key in DEMO_MODELS:
        from ..models import demo

        if weights is not None and not os.path.isfile(weights):
            raise HeartError(f"weights file {weights} does not exist: give a state dict saved for {key}")
        build = demo.demo_vit if key == "demo-vit" else demo.demo_cnn
        return build(pretrained=weights is None, weights=weights)
    if os.path.exists(name):
        from ..models.zoo import load_local

        if weights is not None:
            raise HeartError(f"--model {name} is a local model path; --weights is only for zoo names: drop one of them")
        return load_local(name, family=family)
    from ..models import zoo

    model = zoo.build(name)
    if weights is not None:
        sd = _read_state_dict(weights)
        try:
            model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
        except (RuntimeError, AttributeError, TypeError) as exc:
            raise HeartError(f"weights {weights} do not fit {name} ({str(exc).splitlines()[0][:200]})") from None
    return model.eval()


def load_model_from_args(args: argparse.Namespace, *, module_pickle: bool = False):
    """The model named by ``--model``/``--weights``/``--family`` (see :func:`add_model_flags`), in eval mode.

    With ``--weights`` alone: a state dict through ``zoo.load_local`` (family inferred or ``--family``),
    or, with ``module_pickle=True`` (default False), a whole pickled ``nn.Module`` (``weights_only=False``:
    only for files you made yourself).
    """
    model_name = getattr(args, "model", None)
    weights = getattr(args, "weights", None)
    family = getattr(args, "family", None)
    if not model_name and not weights:
        raise HeartError("give --model NAME (demo-vit, a zoo model or a local path) and/or --weights PATH")
    if model_name:
        return load_named_model(model_name, weights, family)
    if not os.path.isfile(weights):
        raise HeartError(f"weights file {weights} does not exist: give a saved model or state dict")
    if not module_pickle or family is not None:
        from ..models.zoo import load_local

        return load_local(weights, family=family)
    import torch

    try:
        model = torch.load(weights, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise HeartError(f"cannot read model {weights} ({type(exc).__name__}): save it with torch.save(model)") from None
    if not isinstance(model, torch.nn.Module):
        raise HeartError(f"{weights} holds a {type(model).__name__}, not a model: add --model NAME for a state dict")
    return model.eval()


def int_list(text: str | None, what: str) -> list[int] | None:
    """``"3,6,9"`` -> ``[3, 6, 9]`` (None stays None); a ``HeartError`` naming ``what`` otherwise."""
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise HeartError(f"{what} must be comma-separated integers (e.g. 3,6,9), got {text!r}") from None


def float_list(text: str, what: str) -> tuple[float, ...]:
    """``"0.01,0.05"`` -> ``(0.01, 0.05)``; a ``HeartError`` naming ``what`` otherwise."""
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise HeartError(f"{what} must be comma-separated numbers, got {text!r}") from None


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def new_parser(sub: Any, name: str, help: str, example_lines: tuple[str, ...]) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help, description=help, epilog=examples(*example_lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=1, default=_default)
    sys.stdout.write("\n")


def _default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
