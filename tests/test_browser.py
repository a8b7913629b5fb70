"""End to end in a real browser: the app started by `python -m tl_deploy.app` (which runs `streamlit run`),
driven by Playwright in Debian's headless Chromium (never a downloaded browser)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tl_deploy.app import free_port, wait_until_serving
from tl_deploy.errors import TlDeployError
from tl_deploy.runtime import load

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs /usr/bin/chromium: apt-get install -y chromium chromium-driver")


@pytest.fixture()
def server(app_export: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = (tmp_path / "server.log").open("wb")
    # Started from an unrelated folder: the app's config (upload cap) must apply wherever it is launched.
    proc = subprocess.Popen([sys.executable, "-m", "tl_deploy.app", "--model", str(app_export), "--port", str(port),
                             "--address", "127.0.0.1"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_serving(url, proc, timeout=300)  # a ceiling for busy machines
        except TlDeployError as exc:
            log.flush()
            raise RuntimeError(f"{exc}; server log:\n{(tmp_path / 'server.log').read_text()[-3000:]}") from exc
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher and the streamlit server it started
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_upload_in_a_real_browser_shows_the_right_class(server: str, app_export: Path, tiny_data: Path,
                                                        tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    # A real test image the tiny model classifies right, so the label on the page is the true class.
    images = sorted((tiny_data / "test").rglob("*.png"))
    labels, _ = load(app_export).predict(images)
    right = [(p, lab[0]) for p, lab in zip(images, labels) if lab[0] == p.parent.name]
    assert right, "the tiny model gets no test image right; the fixture changed"
    image, label = right[0]
    wrong = sorted({p.parent.name for p in images} - {label})

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server)
            expect(page.get_by_text("Uploads up to 50 MB each")).to_be_visible(timeout=60_000)
            page.locator("[data-testid='stFileUploader'] input[type='file']").first.set_input_files(image)
            prediction = page.get_by_text(f"Prediction: {label} ·")
            expect(prediction).to_be_visible(timeout=60_000)
            for other in wrong:
                expect(page.get_by_text(f"Prediction: {other} ·")).to_have_count(0)
            expect(page.locator("[data-testid='stVegaLiteChart']").first).to_be_visible(timeout=60_000)  # top-5
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
