"""Time to first prediction in the Streamlit app, measured in a real browser (Debian's headless Chromium).

Starts ``streamlit run app/streamlit_app.py -- --model MODEL`` on 127.0.0.1, opens the page in a
fresh browser context, uploads one test image as soon as the uploader is there, and waits for the
prediction to be shown. Per round: a fresh server (cold: the model is loaded by the first session),
then ``--warm`` new sessions on the same server (the loaded model is cached). Prints the figures and
writes bench/results/bench_app.json.

    python bench/bench_app.py [--model export/<run>] [--image PATH] [--rounds 3] [--warm 3]

Default model: the newest export under export/ (``make demo`` writes one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tl_deploy import app as lib  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def start_server(model: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "streamlit", "run", str(lib.APP_SCRIPT), "--server.port", str(port),
           "--server.address", "127.0.0.1", "--", "--model", str(model.resolve())]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def one_session(browser: Any, url: str, image: Path, label: str) -> dict[str, float]:
    """Seconds from navigation to the uploader being ready, and from the upload to the prediction."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    try:
        page = context.new_page()
        start = time.perf_counter()
        page.goto(url)
        uploader = page.locator("[data-testid='stFileUploader'] input[type='file']").first
        uploader.wait_for(state="attached", timeout=120_000)  # drawn only once the model is loaded
        ready = time.perf_counter()
        uploader.set_input_files(image)
        expect(page.get_by_text(f"Prediction: {label} ·")).to_be_visible(timeout=120_000)
        done = time.perf_counter()
    finally:
        context.close()
    return {"open_to_ready_s": ready - start, "upload_to_prediction_s": done - ready,
            "open_to_prediction_s": done - start}


def default_image(model: Path) -> tuple[Path, str]:
    card = lib.read_model_card(model)
    names = json.loads((model / lib.EXPORT_MANIFEST).read_text())["metadata"]["class_names"] \
        if (model / lib.EXPORT_MANIFEST).is_file() else []
    gallery = lib.sample_gallery(card, names, per_class=1)
    if not gallery:
        raise SystemExit("error: no test image found next to the model's training data: pass --image PATH.")
    return Path(gallery[0].source), str(gallery[0].true_label)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="export folder (default: newest under export/)")
    p.add_argument("--image", type=Path, default=None, help="image to upload (default: a test-split image)")
    p.add_argument("--label", default=None, help="its class (default: its folder name)")
    p.add_argument("--rounds", type=int, default=3, help="fresh servers (cold first sessions)")
    p.add_argument("--warm", type=int, default=3, help="further sessions per server (model already cached)")
    args = p.parse_args()
    os.chdir(ROOT)
    model = args.model or lib.default_model()
    image, label = (args.image, args.label or args.image.parent.name) if args.image else default_image(model)

    from playwright.sync_api import sync_playwright

    runs: list[dict[str, Any]] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for round_no in range(args.rounds):
            port = lib.free_port()
            url = f"http://127.0.0.1:{port}"
            start = time.perf_counter()
            proc = start_server(model, port)
            try:
                lib.wait_until_serving(url, proc)
                server_s = time.perf_counter() - start
                for session in range(1 + args.warm):
                    row = one_session(browser, url, image, label)
                    row.update(round=round_no, kind="cold" if session == 0 else "warm", server_start_s=server_s)
                    runs.append(row)
                    print(f"round {round_no} {row['kind']:4s}: open->ready {row['open_to_ready_s']:.2f} s, "
                          f"upload->prediction {row['upload_to_prediction_s']:.2f} s, "
                          f"open->prediction {row['open_to_prediction_s']:.2f} s (server start {server_s:.1f} s)")
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
        browser.close()

    summary: dict[str, Any] = {}
    for kind in ("cold", "warm"):
        rows = [r for r in runs if r["kind"] == kind]
        if rows:
            summary[kind] = {key: statistics.median(r[key] for r in rows)
                             for key in ("open_to_ready_s", "upload_to_prediction_s", "open_to_prediction_s")}
            summary[kind]["sessions"] = len(rows)
    summary["server_start_s"] = statistics.median(r["server_start_s"] for r in runs)
    print(f"\nmodel {model}, image {image} ({label}), {os.cpu_count()} cores; medians:")
    for kind in ("cold", "warm"):
        if kind in summary:
            s = summary[kind]
            print(f"{kind:4s} ({s['sessions']} sessions): page open -> first prediction "
                  f"{s['open_to_prediction_s']:.2f} s (open -> ready {s['open_to_ready_s']:.2f} s + "
                  f"upload -> prediction {s['upload_to_prediction_s']:.2f} s)")
    print(f"server start (process -> healthy): {summary['server_start_s']:.1f} s")
    out = ROOT / "bench" / "results" / "bench_app.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model), "image": str(image), "label": label,
                               "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
                               "summary": summary, "runs": runs}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
