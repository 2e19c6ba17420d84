"""Jupyter integration: budget-tuning widgets and the jupyter_server extension behind the JupyterLab front end.

The widgets import ipywidgets lazily (``pip install 'heart-onnx[jupyter]'``).
"""
from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "heart_onnx.jupyter"}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "heart-onnx"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    from .server import setup_handlers

    setup_handlers(server_app)


def __getattr__(name: str) -> Any:
    if name == "BudgetTuner":
        from .tuner import BudgetTuner

        return BudgetTuner
    raise AttributeError(name)
