"""The ``heart-onnx`` command: thin subcommands that load, call the library, and save.

Each subcommand lives in ``heart_onnx/cli/<name>.py`` and defines ``register(subparsers)`` (which
adds its parser and sets ``func``). Exit codes: 0 success, 1 user error (one clear line, no
traceback), 2 usage error (argparse).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import HeartError

COMMANDS = ("inspect", "analyze", "plan", "prune", "verify", "bench", "sweep", "finetune", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heart-onnx",
        description="Hessian-guided pruning of ViTs, CNNs and LLMs, applied to ONNX by graph surgery.",
        epilog="Run 'heart-onnx COMMAND --help' for examples. Start with 'heart-onnx demo'.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"heart-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"heart_onnx.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"heart_onnx.cli.{name}":
                continue  # subcommand not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return _leave_process_group(_run(args))


def _leave_process_group(rc: int) -> int:
    """Under torchrun: tear the process group down (on success) and end with ``os._exit(rc)``, since
    interpreter finalization can abort while Gloo threads still release tensors
    (``sensitivity.distributed.finish``). Single-process: returns ``rc``."""
    dist_mod = sys.modules.get("heart_onnx.sensitivity.distributed")  # imported only if a command used it
    if dist_mod is None or not dist_mod.owns_group():
        return rc
    if rc == 0:
        dist_mod.finish()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _run(args) -> int:
    try:
        rc = args.func(args)
    except HeartError as exc:
        print(f"heart-onnx {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"heart-onnx {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug, not a user error: short message unless debugging
        if os.environ.get("HEART_ONNX_DEBUG"):
            raise
        print(f"heart-onnx {args.command}: internal error: {type(exc).__name__}: {exc} "
              f"(set HEART_ONNX_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
