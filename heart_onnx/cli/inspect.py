"""``heart-onnx inspect MODEL.onnx``: I/O, params, FLOPs by op, attention blocks, stored plan."""
from __future__ import annotations

import argparse
from typing import Any

from ..errors import HeartError
from .common import add_json_flag, add_onnx_input, emit_json, new_parser


def _dim(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dim wants NAME=INT (e.g. seq=128), got {text!r}") from None
    if not name or v < 1:
        raise argparse.ArgumentTypeError(f"--dim wants NAME=INT with INT >= 1, got {text!r}")
    return name, v


def register(sub: Any) -> None:
    p = new_parser(sub, "inspect", "show an ONNX model's inputs, parameters, FLOPs and attention blocks", (
        "heart-onnx inspect model.onnx",
        "heart-onnx inspect pythia.onnx --dim seq=128 --json",
        "heart-onnx inspect model.onnx --require-attention   # exit 1 if no attention block is found",
    ))
    add_onnx_input(p, help="the ONNX file (external data beside it is checked, not read)")
    p.add_argument("--dim", type=_dim, action="append", default=[], metavar="NAME=INT",
                   help="value of a symbolic input dim for the FLOPs count (default: 1 for each)")
    p.add_argument("--require-attention", action="store_true",
                   help="fail (exit 1) when the graph has no attention block")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..inspect import format_table, inspect

    info = inspect(args.model, dims=dict(args.dim) or None)
    if args.require_attention and not info["attention"]:
        why = f": {info['attention_error']}" if info.get("attention_error") else ""
        raise HeartError(f"{args.model} has no attention blocks{why} (drop --require-attention for CNNs)")
    if args.json:
        emit_json(info)
    else:
        print(format_table(info))
    return 0
