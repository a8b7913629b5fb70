"""The Streamlit app under several concurrent browser sessions, on loopback, for a bounded time.

    python bench/bench_app_concurrency.py --model export/<run> --sessions 6 --uploads 5

Starts ``streamlit run app/streamlit_app.py -- --model MODEL`` on 127.0.0.1 (a free port, headless,
no usage stats), opens ``--sessions`` separate browser contexts at once in one headless Chromium
(each is its own Streamlit session), and in each uploads ``--uploads`` images one after another,
timing page load and upload -> prediction shown (``--expect`` text, default ``Prediction:``). Every
wait has a timeout and the whole run stops after ``--max-seconds``. Reports load and prediction
latency percentiles, failed sessions, and the server's resident memory before and after. Prints one
``PASSED | ...`` / ``FAILED | ...`` line and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tl_deploy.app import free_port, wait_until_serving

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def idle(page: Any, timeout_ms: float) -> None:
    """Wait until Streamlit's 'Running...' status widget is gone (the script run finished)."""
    await page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms)


async def session(browser: Any, url: str, images: list[Path], uploads: int, expect: str, timeout_ms: float,
                  index: int) -> dict[str, Any]:
    context = await browser.new_context()
    page = await context.new_page()
    result: dict[str, Any] = {"session": index, "load_s": None, "predict_s": [], "error": None}
    try:
        start = time.perf_counter()
        await page.goto(url, timeout=timeout_ms)
        uploader = page.locator("input[type=file]").first
        await uploader.wait_for(state="attached", timeout=timeout_ms)
        await idle(page, timeout_ms)
        result["load_s"] = time.perf_counter() - start
        for k in range(uploads):
            image = images[(index * uploads + k) % len(images)]
            start = time.perf_counter()
            await uploader.set_input_files(str(image))
            # One more prediction on the page than before, and the run finished.
            await page.get_by_text(expect).nth(k).wait_for(state="visible", timeout=timeout_ms)
            await idle(page, timeout_ms)
            result["predict_s"].append(time.perf_counter() - start)
    except Exception as exc:  # a timeout or a crashed page is a failed session, reported, not raised
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        await context.close()
    return result


async def run_sessions(url: str, images: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=args.chromium, headless=True,
            args=["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            tasks = [session(browser, url, images, args.uploads, args.expect, args.timeout * 1000, i)
                     for i in range(args.sessions)]
            return list(await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.max_seconds))
        finally:
            await browser.close()


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--app", type=Path, default=ROOT / "app" / "streamlit_app.py")
    p.add_argument("--model", required=True, help="model folder or file passed to the app as --model")
    p.add_argument("--images", type=Path, default=ROOT / "data" / "animal-shape" / "test")
    p.add_argument("--sessions", type=int, default=6, help="concurrent browser sessions")
    p.add_argument("--uploads", type=int, default=5, help="images uploaded one after another per session")
    p.add_argument("--expect", default="Prediction:", help="text that shows a prediction on the page")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any single wait may take")
    p.add_argument("--max-seconds", type=float, default=300.0, help="bound on the whole browser phase")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "app_concurrency.json")
    args = p.parse_args()
    if not args.app.is_file():
        raise SystemExit(f"{args.app} not found: this measures the Streamlit app, which must exist first.")
    images = sorted(q for q in args.images.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SystemExit(f"no images under {args.images}")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    cmd = [sys.executable, "-m", "streamlit", "run", str(args.app), "--server.address", "127.0.0.1",
           "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
           "--", "--model", args.model]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_serving(url, server, timeout=120)
        rss_before = rss_mib(server.pid)
        start = time.perf_counter()
        try:
            results = asyncio.run(run_sessions(url, images, args))
        except asyncio.TimeoutError:
            results = [{"session": i, "load_s": None, "predict_s": [], "error": "run exceeded --max-seconds"}
                       for i in range(args.sessions)]
        wall = time.perf_counter() - start
        rss_after = rss_mib(server.pid)
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

    loads = [r["load_s"] for r in results if r["load_s"] is not None]
    preds = [s for r in results for s in r["predict_s"]]
    failed = [r for r in results if r["error"]]
    summary = {
        "app": str(args.app), "model": args.model, "sessions": args.sessions, "uploads_per_session": args.uploads,
        "wall_s": round(wall, 1), "server_alive": alive, "failed_sessions": len(failed),
        "errors": [r["error"] for r in failed][:5],
        "predictions": len(preds), "expected_predictions": args.sessions * args.uploads,
        "page_load_s": {"p50": pct(loads, 50), "max": pct(loads, 100)},
        "upload_to_prediction_s": {"p50": pct(preds, 50), "p95": pct(preds, 95), "p99": pct(preds, 99),
                                   "max": pct(preds, 100)},
        "server_rss_mib": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    ok = alive and not failed and len(preds) == args.sessions * args.uploads
    print(f"{'PASSED' if ok else 'FAILED'} | {args.sessions} sessions x {args.uploads} uploads: "
          f"{len(preds)} predictions, {len(failed)} failed sessions, upload->prediction p50 "
          f"{summary['upload_to_prediction_s']['p50']} s p99 {summary['upload_to_prediction_s']['p99']} s, "
          f"server RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
