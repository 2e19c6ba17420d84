"""The jupyter_server extension against a real server on loopback: inspect, path rules, auth, tuner notebook."""
import json
import urllib.error
import urllib.request

import pytest

pytest.importorskip("jupyter_server")

from jupyter_helpers import jupyter_server  # noqa: E402


def _get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except json.JSONDecodeError:
            return e.code, {"raw": body.decode(errors="replace")}


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_onnx_factory):
    root = tmp_path_factory.mktemp("root")
    (root / "sub").mkdir()
    demo_onnx_factory(root / "sub" / "demo_vit.onnx")
    (root / "notes.onnx").write_text("this is not an ONNX model")
    (root.parent / "secret.onnx").write_bytes((root / "sub" / "demo_vit.onnx").read_bytes())
    with jupyter_server(root) as (base, token):
        yield root, base, token


def test_inspect_endpoint_reports_heads(served):
    root, base, token = served
    code, body = _get(f"{base}/heart-onnx/inspect?path=sub/demo_vit.onnx", {"Authorization": f"token {token}"})
    assert code == 200, body
    from heart_onnx.models.demo import demo_vit

    model = demo_vit()
    heads = model.blocks[0].attn.num_heads
    assert len(body["attention"]) == len(model.blocks)
    assert all(a["heads"] == heads for a in body["attention"])
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(body["params"] - n_params) <= 1e-3 * n_params  # the graph also holds a few scalar constants


@pytest.mark.parametrize("path,code", [
    ("../secret.onnx", 403),
    ("/etc/passwd", 404),  # absolute paths are taken relative to the root, where it does not exist
    ("sub/../../secret.onnx", 403),
    ("missing.onnx", 404),
    ("notes.onnx", 400),
    ("sub", 400),
    ("", 400),
])
def test_inspect_endpoint_rejects_bad_paths(served, path, code):
    root, base, token = served
    got, body = _get(f"{base}/heart-onnx/inspect?path={path}", {"Authorization": f"token {token}"})
    assert got == code, body
    assert body.get("message"), body


def test_request_without_token_is_refused(served):
    root, base, token = served
    got, _ = _get(f"{base}/heart-onnx/inspect?path=sub/demo_vit.onnx")
    assert got == 403
    got, _ = _get(f"{base}/heart-onnx/inspect?path=sub/demo_vit.onnx", {"Authorization": "token wrong"})
    assert got == 403


def test_tuner_endpoint_writes_notebook_next_to_model(served):
    root, base, token = served
    req = urllib.request.Request(f"{base}/heart-onnx/tuner", data=json.dumps({"path": "sub/demo_vit.onnx"}).encode(),
                                 headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        body = json.loads(r.read())
    assert body["path"] == "sub/demo_vit.tuner.ipynb"
    nb = json.loads((root / body["path"]).read_text())
    src = "".join("".join(c["source"]) for c in nb["cells"])
    assert "BudgetTuner.for_onnx('demo_vit.onnx')" in src
