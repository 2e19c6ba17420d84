"""Argument conventions shared by every subcommand."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout")


def add_output_flag(p: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    p.add_argument("-o", "--output", required=required, metavar="PATH", help=f"where to write {what} (written atomically)")


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
