"""End to end in a real browser: the app started by `python -m tl_deploy.app`, driven by Playwright in
Debian's headless Chromium (never a downloaded browser), along the path a user takes. After every step
the test asserts which engine produced each prediction on the page: the browser's round trip of widget
values is what Streamlit's AppTest cannot see."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tl_deploy.app import free_port, wait_until_serving
from tl_deploy.errors import TlDeployError
from tl_deploy.runtime import load

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]
WAIT_MS = 60_000  # a ceiling for busy machines; each step normally takes well under a second

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs /usr/bin/chromium: apt-get install -y chromium chromium-driver")


@pytest.fixture()
def server(app_export: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = (tmp_path / "server.log").open("wb")
    # Started in the project folder, as after `make demo`: export/tiny and models/tiny are both listed,
    # under the same run name, so the model choices must stay apart through every browser round trip.
    proc = subprocess.Popen([sys.executable, "-m", "tl_deploy.app", "--model", str(app_export), "--port", str(port)],
                            cwd=app_export.parent.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_serving(url, proc, timeout=300)
        except TlDeployError as exc:
            log.flush()
            raise RuntimeError(f"{exc}; server log:\n{(tmp_path / 'server.log').read_text()[-3000:]}") from exc
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def expect_engine(page: Any, engine: str, predictions: int) -> None:
    """The banner names ``engine``, and so does each of the ``predictions`` prediction lines shown."""
    from playwright.sync_api import expect

    expect(page.locator("[data-testid='stAlert']").filter(has_text="Running")).to_contain_text(
        f"Running {engine}", timeout=WAIT_MS)
    lines = page.locator("[data-testid='stMarkdown']").filter(has_text=re.compile(r"^Prediction: "))
    expect(lines).to_have_count(predictions, timeout=WAIT_MS)
    expect(lines.filter(has_text=f"· {engine} ")).to_have_count(predictions, timeout=WAIT_MS)


def test_user_path_every_prediction_comes_from_the_engine_shown(server: str, app_export: Path, tiny_data: Path,
                                                                tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    images = sorted((tiny_data / "test").rglob("*.png"))
    labels, _ = load(app_export, backend="onnxruntime", precision="int8").predict(images)
    first, second = images[0], images[-1]
    zip_path = tmp_path / "set.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in images:
            zf.write(p, f"set/{p.parent.name}/{p.name}")
    zip_path.write_bytes(buf.getvalue())

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            # 1. Open: the fastest file here, INT8 on ONNX Runtime's CPU provider.
            page.goto(server)
            expect(page.get_by_text("Uploads up to 50 MB each")).to_be_visible(timeout=WAIT_MS)
            expect_engine(page, "onnxruntime · int8", 0)
            uploader = page.locator("input[type='file'][accept*='.png']").first
            # 2. Upload one image: its prediction, and the engine next to it.
            uploader.set_input_files(first)
            expect(page.get_by_text(f"Prediction: {labels[0][0]} ·")).to_be_visible(timeout=WAIT_MS)
            expect_engine(page, "onnxruntime · int8", 1)
            # 3. Upload a second image: both shown, both from the same engine.
            uploader.set_input_files(second)
            expect_engine(page, "onnxruntime · int8", 2)
            # 4. Switch tab.
            page.get_by_role("tab", name="Batch").click()
            expect_engine(page, "onnxruntime · int8", 2)
            # 5. Batch zip: the results say which engine classified them.
            page.locator("input[type='file'][accept*='.zip']").set_input_files(zip_path)
            page.get_by_role("button", name=f"Classify {len(images)} images").click()
            expect(page.get_by_text(f"Classified {len(images)} images on onnxruntime · int8")).to_be_visible(
                timeout=WAIT_MS)
            expect_engine(page, "onnxruntime · int8", 2)
            # 6. Switch the backend explicitly, then back: every prediction follows the switch.
            sidebar = page.get_by_test_id("stSidebar")
            sidebar.get_by_text("ONNX Runtime FP32", exact=True).click()
            expect_engine(page, "onnxruntime · fp32", 2)
            page.get_by_role("tab", name="Classify").click()
            expect_engine(page, "onnxruntime · fp32", 2)
            sidebar.get_by_text("ONNX Runtime INT8", exact=True).click()
            expect_engine(page, "onnxruntime · int8", 2)
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
