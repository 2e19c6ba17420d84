"""JupyterLab in headless Chromium: the quickstart notebook runs, the tuner renders and follows the slider,
and an .onnx file opened from the file browser shows the viewer with the right head count.

Screenshots are kept under ``artifacts/screenshots/`` (set HEART_ONNX_ARTIFACTS to move them).
"""
import os
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/setup does it as root)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'heart-onnx[dev]')")

from jupyter_helpers import jupyter_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("HEART_ONNX_ARTIFACTS", REPO / "artifacts")) / "screenshots"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, demo_onnx_factory):
    from jupyter_server.serverapp import ServerApp  # noqa: F401  (jupyterlab present)

    lab_dir = Path(__import__("jupyterlab").__file__).parent
    if not any((Path(p) / "heart-onnx").exists() for p in _labext_paths()):
        pytest.fail("the heart-onnx labextension is not installed in this environment: run 'bash .ci/setup'")
    root = tmp_path_factory.mktemp("labroot")
    shutil.copy(REPO / "notebooks" / "quickstart.ipynb", root / "quickstart.ipynb")
    demo_onnx_factory(root / "demo_vit.onnx")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with jupyter_server(root, app="jupyterlab", timeout=120) as (base, token):
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            yield root, base, token, browser
            browser.close()
    del lab_dir


def _labext_paths():
    from jupyter_core.paths import jupyter_path

    return jupyter_path("labextensions")


def _wait_idle(page, timeout=240_000):
    page.wait_for_selector(".jp-Notebook", timeout=timeout)
    page.wait_for_function(
        "() => document.querySelectorAll('.jp-InputArea-prompt').length > 0 && "
        "![...document.querySelectorAll('.jp-InputArea-prompt')].some(p => p.textContent.includes('*'))",
        timeout=timeout)


def test_quickstart_runs_and_tuner_follows_slider(lab):
    root, base, token, browser = lab
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(f"{base}/lab/tree/quickstart.ipynb?token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    # the kernel must be up before "Run All Cells" (the status bar shows "... | Idle")
    page.wait_for_function("() => /\\|\\s*Idle/.test(document.querySelector('.jp-StatusBar-Widget')?.parentElement?.textContent || '')",
                           timeout=180_000)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_text("Run All Cells", exact=True).click()
    try:
        page.wait_for_selector("svg[data-plot='pareto'], .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                               timeout=300_000)
        assert page.locator("svg[data-plot='pareto']").count() > 0, \
            page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").first.inner_text()[:3000]
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "tuner-timeout.png"), full_page=True)
        raise
    page.wait_for_selector("svg[data-plot='heatmap']", timeout=60_000)
    _wait_idle(page)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    tracebacks = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t]
    assert not tracebacks, tracebacks
    page.screenshot(path=str(ARTIFACTS / "tuner-initial.png"), full_page=True)

    def state():
        circle = page.locator("svg[data-plot='pareto'] circle").first
        return (circle.get_attribute("data-current-flops"), page.locator("[data-tuner='heads']").first.inner_text(),
                page.locator("[data-tuner='tokens']").first.inner_text())

    before = state()
    # drag the budget slider's handle to the left (less budget: less is pruned, more FLOPs)
    handle = page.locator(".widget-slider .noUi-handle").first
    track = page.locator(".widget-slider .noUi-target").first
    hb, tb = handle.bounding_box(), track.bounding_box()
    page.mouse.move(hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2)
    page.mouse.down()
    page.mouse.move(tb["x"] + 0.15 * tb["width"], hb["y"] + hb["height"] / 2, steps=12)
    page.mouse.up()
    page.wait_for_function(
        "([f]) => { const c = document.querySelector(\"svg[data-plot='pareto'] circle\");"
        " return c && c.getAttribute('data-current-flops') !== f; }", arg=[before[0]], timeout=30_000)
    after = state()
    assert float(after[0]) > float(before[0]), (before, after)
    assert after != before
    page.screenshot(path=str(ARTIFACTS / "tuner-after-slider.png"), full_page=True)


def test_onnx_file_opens_in_viewer_with_head_count(lab):
    root, base, token, browser = lab
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    from heart_onnx.models.demo import demo_vit

    model = demo_vit()
    heads, layers = model.blocks[0].attn.num_heads, len(model.blocks)
    page.goto(f"{base}/lab?token={token}")
    item = page.locator(".jp-DirListing-item", has_text="demo_vit.onnx").first
    item.wait_for(timeout=120_000)
    try:
        item.dblclick()
        table = page.locator(".jp-HeartOnnxViewer table[data-heart-onnx='attention']").first
        table.wait_for(timeout=60_000)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "viewer-timeout.png"), full_page=True)
        raise
    table = page.locator(".jp-HeartOnnxViewer table[data-heart-onnx='attention']").first
    table.wait_for(timeout=60_000)
    rows = table.locator("tr")
    assert rows.count() == layers + 1  # header + one row per block
    head_cells = [rows.nth(i).locator("td").nth(1).inner_text() for i in range(1, layers + 1)]
    assert head_cells == [str(heads)] * layers
    summary = page.locator(".jp-HeartOnnxViewer table[data-heart-onnx='summary']").first.inner_text()
    assert re.search(rf"heads \(total\)\s+{heads * layers}\b", summary), summary
    page.screenshot(path=str(ARTIFACTS / "onnx-viewer.png"), full_page=True)
