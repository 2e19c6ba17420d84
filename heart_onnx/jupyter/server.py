"""jupyter_server handlers behind the JupyterLab extension.

- ``GET  /heart-onnx/inspect?path=REL`` -> the ``heart-onnx inspect`` summary of a file under the root.
- ``POST /heart-onnx/tuner`` ``{"path": REL}`` -> writes a budget-tuning notebook next to the model
  (or for the embedded demo model when ``path`` is empty) and returns its path.

Both use Jupyter's own authentication (``@tornado.web.authenticated`` on ``APIHandler``, which also
checks XSRF on POST) and read only files under the server's root directory: a path that resolves
outside it (``..``, absolute, or a symlink) is refused with 403.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from ..errors import HeartError


def resolve_under_root(root: str | os.PathLike, rel: str) -> Path:
    """Resolve ``rel`` (an API path, '/'-separated) under ``root``; 403 if it escapes, 404 if missing."""
    if rel is None or rel.strip() == "":
        raise tornado.web.HTTPError(400, reason="missing 'path'")
    root_p = Path(root).resolve()
    candidate = (root_p / rel.lstrip("/")).resolve()
    if candidate != root_p and root_p not in candidate.parents:
        raise tornado.web.HTTPError(403, reason=f"{rel} is outside the server's root directory")
    if not candidate.exists():
        raise tornado.web.HTTPError(404, reason=f"{rel} does not exist")
    if not candidate.is_file():
        raise tornado.web.HTTPError(400, reason=f"{rel} is not a file")
    return candidate


class _Base(APIHandler):
    @property
    def root_dir(self) -> str:
        return self.settings.get("server_root_dir") or self.contents_manager.root_dir

    def write_error(self, status_code: int, **kwargs) -> None:  # JSON errors with the reason, not HTML
        self.set_header("Content-Type", "application/json")
        reason = self._reason
        exc = kwargs.get("exc_info")
        if exc and isinstance(exc[1], tornado.web.HTTPError) and exc[1].reason:
            reason = exc[1].reason
        self.finish(json.dumps({"status": status_code, "message": reason}))


class InspectHandler(_Base):
    @tornado.web.authenticated
    def get(self) -> None:
        path = resolve_under_root(self.root_dir, self.get_argument("path", ""))
        from ..inspect import inspect as inspect_model

        try:
            summary = inspect_model(str(path))
        except HeartError as exc:
            raise tornado.web.HTTPError(400, reason=str(exc)) from None
        summary["path"] = self.get_argument("path")
        self.finish(json.dumps(summary, default=_json_default))


class TunerHandler(_Base):
    @tornado.web.authenticated
    def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"{}")
        except json.JSONDecodeError:
            raise tornado.web.HTTPError(400, reason="request body is not JSON") from None
        rel = (body.get("path") or "").strip()
        from .tuner_notebook import write_tuner_notebook

        root = Path(self.root_dir).resolve()
        if rel:
            model = resolve_under_root(root, rel)
            if model.suffix != ".onnx":
                raise tornado.web.HTTPError(400, reason=f"{rel} is not an .onnx file")
            nb_path = write_tuner_notebook(model_path=model, directory=model.parent, root=root)
        else:
            nb_path = write_tuner_notebook(model_path=None, directory=root, root=root)
        self.finish(json.dumps({"path": nb_path.relative_to(root).as_posix()}))


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def setup_handlers(server_app) -> None:
    web_app = server_app.web_app
    base = web_app.settings["base_url"]
    web_app.settings.setdefault("server_root_dir", server_app.root_dir)
    web_app.add_handlers(".*$", [
        (url_path_join(base, "heart-onnx", "inspect"), InspectHandler),
        (url_path_join(base, "heart-onnx", "tuner"), TunerHandler),
    ])
