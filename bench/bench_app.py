"""Time to first prediction in the Streamlit app, measured in a real browser (Debian's headless Chromium).

Starts ``python -m tl_deploy.app --model MODEL`` on 127.0.0.1 (the launcher loads and warms the model
before the server answers; ``--plain-streamlit`` starts ``streamlit run`` instead, so the first session
loads it), opens the page in a fresh browser context, uploads one test image as soon as the uploader is
there, uploads a second one, and waits for each prediction to be shown and to name the engine. Per
round: a fresh server (the first session is "cold"), then ``--warm`` new sessions on the same server.

Where the time goes, per session (seconds from the previous mark):
  page open:  front end loaded (HTML + JS, the browser's load event) -> title drawn (websocket up, script
              started) -> uploader ready (script reached the Classify tab)
  upload:     file sent (the uploader lists it) -> prediction shown (fragment rerun: decode, predict, draw)
Targets (issue 14): page open -> uploader ready <= 3 s, upload -> prediction <= 1.0 s (medians, idle
2-core machine). Prints the figures and writes bench/results/bench_app.json.

    python bench/bench_app.py [--model export/<run>] [--image PATH] [--rounds 3] [--warm 3] [--plain-streamlit]

Default model: the newest export under export/ (``make demo`` writes one). Run it from the project folder
that holds export/, models/ and data/.
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
from tl_deploy import model_card  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


PHASES = ("front_end_s", "title_s", "uploader_s", "send_s", "predict_draw_s", "second_upload_s")


def start_server(model: Path, port: int, plain: bool) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if plain:
        cmd = [sys.executable, "-m", "streamlit", "run", str(lib.APP_SCRIPT), "--server.port", str(port),
               "--server.address", "127.0.0.1", "--", "--model", str(model.resolve())]
    else:
        cmd = [sys.executable, "-m", "tl_deploy.app", "--model", str(model), "--port", str(port)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def one_session(browser: Any, url: str, images: list[tuple[Path, str]]) -> dict[str, Any]:
    """Marks along page open and two uploads; the prediction must name the engine the banner names."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    marks: dict[str, float] = {}
    try:
        page = context.new_page()
        marks["start"] = time.perf_counter()
        page.goto(url, wait_until="load", timeout=120_000)
        marks["front_end"] = time.perf_counter()
        page.get_by_text("Classify images").first.wait_for(timeout=120_000)
        marks["title"] = time.perf_counter()
        uploader = page.locator("input[type='file'][accept*='.png']").first
        uploader.wait_for(state="attached", timeout=120_000)
        marks["uploader"] = time.perf_counter()
        with page.expect_response(lambda r: r.request.method == "PUT" and "upload_file" in r.url,
                                  timeout=120_000):
            uploader.set_input_files(images[0][0])
        marks["send"] = time.perf_counter()  # the server has the file
        expect(page.get_by_text(f"Prediction: {images[0][1]} ·")).to_be_visible(timeout=120_000)
        marks["predict_draw"] = time.perf_counter()
        uploader.set_input_files(images[1][0])
        lines = page.locator("[data-testid='stMarkdown']").filter(has_text="Prediction: ")
        expect(lines).to_have_count(2, timeout=120_000)
        marks["second_upload"] = time.perf_counter()
        banner = page.locator("[data-testid='stAlert']").filter(has_text="Running").inner_text()
        engine = " · ".join(banner.removeprefix("Running ").split(" · ")[:2])  # e.g. "onnxruntime · int8 on cpu"
        shown = lines.all_inner_texts()
    finally:
        context.close()
    keys = ["start", "front_end", "title", "uploader", "send", "predict_draw", "second_upload"]
    row: dict[str, Any] = {f"{b}_s": marks[b] - marks[a] for a, b in zip(keys, keys[1:])}
    row["open_to_ready_s"] = marks["uploader"] - marks["start"]
    row["upload_to_prediction_s"] = marks["predict_draw"] - marks["uploader"]
    row["open_to_prediction_s"] = marks["predict_draw"] - marks["start"]
    row["engine"] = engine
    row["every_prediction_names_the_engine"] = all(f"· {engine}" in line for line in shown)
    return row


def default_images(model: Path) -> list[tuple[Path, str]]:
    """Two test-split images of different classes, the second class's first."""
    from tl_deploy.formats.export_manifest import is_export_folder, read_export_manifest

    card = model_card.read_model_card(model)
    names = read_export_manifest(model)["metadata"]["class_names"] if is_export_folder(model) else []
    gallery = model_card.sample_gallery(card, names, per_class=1)
    if len(gallery) < 2:
        raise SystemExit("error: no test images found next to the model's training data: pass --image PATH.")
    return [(Path(item.source), str(item.true_label)) for item in gallery[:2]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="export folder (default: newest under export/)")
    p.add_argument("--image", type=Path, default=None,
                   help="image to upload, twice (default: two test-split images of different classes)")
    p.add_argument("--label", default=None, help="its class (default: its folder name)")
    p.add_argument("--plain-streamlit", action="store_true",
                   help="start `streamlit run` (first session loads the model) instead of python -m tl_deploy.app")
    p.add_argument("--rounds", type=int, default=3, help="fresh servers (cold first sessions)")
    p.add_argument("--warm", type=int, default=3, help="further sessions per server (model already cached)")
    args = p.parse_args()
    if args.rounds < 1 or args.warm < 0:
        raise SystemExit("error: --rounds must be >= 1 and --warm >= 0.")
    model = args.model or model_card.default_model()
    images = [(args.image, args.label or args.image.parent.name)] * 2 if args.image else default_images(model)

    from playwright.sync_api import sync_playwright

    runs: list[dict[str, Any]] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for round_no in range(args.rounds):
            port = lib.free_port()
            url = f"http://127.0.0.1:{port}"
            start = time.perf_counter()
            proc = start_server(model, port, args.plain_streamlit)
            try:
                lib.wait_until_serving(url, proc, timeout=300)
                server_s = time.perf_counter() - start
                for session in range(1 + args.warm):
                    row = one_session(browser, url, images)
                    row.update(round=round_no, kind="cold" if session == 0 else "warm", server_start_s=server_s)
                    runs.append(row)
                    print(f"round {round_no} {row['kind']:4s}: open->ready {row['open_to_ready_s']:.2f} s "
                          f"(front end {row['front_end_s']:.2f} + title {row['title_s']:.2f} + uploader "
                          f"{row['uploader_s']:.2f}), upload->prediction {row['upload_to_prediction_s']:.2f} s "
                          f"(send {row['send_s']:.2f} + predict/draw {row['predict_draw_s']:.2f}), second upload "
                          f"{row['second_upload_s']:.2f} s, engine {row['engine']}"
                          f"{'' if row['every_prediction_names_the_engine'] else ' (A PREDICTION NAMES ANOTHER)'}"
                          f" (server start {server_s:.1f} s)")
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
        browser.close()

    summary: dict[str, Any] = {}
    for kind in ("cold", "warm"):
        rows = [r for r in runs if r["kind"] == kind]
        if rows:
            summary[kind] = {key: statistics.median(r[key] for r in rows)
                             for key in ("open_to_ready_s", "upload_to_prediction_s", "open_to_prediction_s",
                                         *PHASES)}
            summary[kind]["sessions"] = len(rows)
            summary[kind]["every_prediction_names_the_engine"] = all(r["every_prediction_names_the_engine"]
                                                                     for r in rows)
    summary["server_start_s"] = statistics.median(r["server_start_s"] for r in runs)
    print(f"\nmodel {model}, images {[str(p) for p, _ in images]}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; medians:")
    for kind in ("cold", "warm"):
        if kind in summary:
            s = summary[kind]
            print(f"{kind:4s} ({s['sessions']} sessions): page open -> first prediction "
                  f"{s['open_to_prediction_s']:.2f} s (open -> ready {s['open_to_ready_s']:.2f} s + "
                  f"upload -> prediction {s['upload_to_prediction_s']:.2f} s); phases: "
                  + ", ".join(f"{k.removesuffix('_s')} {s[k]:.2f}" for k in PHASES))
    print(f"server start (process -> healthy{'' if args.plain_streamlit else ', model loaded and warmed'}): "
          f"{summary['server_start_s']:.1f} s")
    targets = {"open_to_ready_s": 3.0, "upload_to_prediction_s": 1.0}
    for key, limit in targets.items():
        worst = max(summary[k][key] for k in ("cold", "warm") if k in summary)
        print(f"{'PASSED' if worst <= limit else 'FAILED'} | {key.removesuffix('_s')} median {worst:.2f} s "
              f"(worst of cold/warm) {'<=' if worst <= limit else '>'} {limit:g} s")
    out = ROOT / "bench" / "results" / "bench_app.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model), "images": [[str(p), lab] for p, lab in images],
                               "launcher": "streamlit run" if args.plain_streamlit else "python -m tl_deploy.app",
                               "load_average": os.getloadavg(),
                               "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
                               "summary": summary, "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
