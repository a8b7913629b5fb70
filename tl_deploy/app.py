"""Start the Streamlit app: ``python -m tl_deploy.app [--model PATH]`` serves it on 127.0.0.1, with the
default model loaded and warmed before the server answers.

The page itself (``app/streamlit_app.py``) only lays out widgets. What it needs that is not drawing is
plain Python, unit-tested without a browser: ``tl_deploy.model_card`` (finding models, the backends
they run on here, the model card) and ``tl_deploy.uploads`` (reading uploads safely, batch
classification). This module is the launcher.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tl_deploy.errors import ArtifactError, DataError, TlDeployError
from tl_deploy.model_card import default_model, warm_start

_logger = logging.getLogger(__name__)

APP_SCRIPT = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
MODEL_ENV = "TL_DEPLOY_MODEL"  # model path for the page when no --model is given (tests, services)
DATA_ROOTS_ENV = "TL_DEPLOY_DATA_ROOTS"  # server folders the page may read, os.pathsep-separated, when no --data-root
LOOPBACK_NAMES = ("localhost",)
# What the page's first run and first prediction would otherwise import while a visitor waits
# (measured: pyarrow for tables, altair for the top-5 chart); imported by the launcher before serving.
PAGE_IMPORTS = ("pandas", "pyarrow", "altair", "tl_deploy.reports")


# ---------------------------------------------------------------------------------------------
# Launcher


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now, to start a server on."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until_serving(url: str, proc: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    """Poll Streamlit's health endpoint until it answers; TlDeployError if the server exits first or the
    time runs out."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TlDeployError(f"The app exited with code {proc.returncode} before serving {url}.")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TlDeployError(f"The app did not answer on {url} within {timeout:.0f} s.")


def get_args_parser() -> argparse.ArgumentParser:
    from tl_deploy.cli import Range, add_verbose, new_parser

    p = new_parser("app", "Start the Streamlit app that classifies images with an exported model.")
    p.add_argument("--model", type=Path, default=None, metavar="PATH",
                   help="export folder, model artifact folder or .onnx/.engine file (default: newest under export/)")
    p.add_argument("--port", type=Range(int, 1, 65535), default=None, metavar="N",
                   help="port to serve on (default: Streamlit's, 8501)")
    p.add_argument("--address", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only); 0.0.0.0 serves every "
                        "interface and prints a warning")
    p.add_argument("--data-root", type=Path, action="append", default=None, dest="data_roots", metavar="DIR",
                   help="a server folder the Batch tab may read, repeatable (default: the model's own "
                        "training data when it is on disk, else none)")
    add_verbose(p)
    return p


def is_loopback(address: str) -> bool:
    if address in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def streamlit_args(model: Path | None, port: int | None, address: str,
                   data_roots: Sequence[Path] | None = None) -> list[str]:
    """``streamlit run app/streamlit_app.py`` arguments; the app's .streamlit/config.toml applies."""
    if not APP_SCRIPT.is_file():
        raise TlDeployError(f"App script not found: {APP_SCRIPT}. Run from a tl_deploy source checkout.")
    args = ["run", str(APP_SCRIPT), "--server.address", address]
    if port is not None:
        args += ["--server.port", str(port)]
    page = ["--model", str(model.resolve())] if model is not None else []
    for root in data_roots or []:
        page += ["--data-root", str(root.resolve())]
    return args + (["--", *page] if page else [])


def serve(args: Sequence[str]) -> int:
    """Run Streamlit's server in this process, so SIGTERM and SIGINT stop it (Streamlit's own handlers)
    and the classifier warmed here is the one the page uses: no child process is left behind."""
    from streamlit.web import cli as streamlit_cli

    try:
        streamlit_cli.main(args=list(args), prog_name="streamlit", standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from tl_deploy.cli import run_cli

    def body(args: argparse.Namespace) -> int:
        if args.model is not None and not args.model.exists():
            raise ArtifactError(f"Model not found: {args.model}. Give an export folder, artifact folder or .onnx file.")
        if args.port is not None and not 1 <= args.port <= 65535:
            raise TlDeployError(f"Invalid --port {args.port}: give a port from 1 to 65535.")
        for root in args.data_roots or []:
            if not root.is_dir():
                raise DataError(f"--data-root {root} is not a folder: give an existing folder of images.")
        command = streamlit_args(args.model, args.port, args.address, args.data_roots)
        if not is_loopback(args.address):
            print(f"warning: serving on {args.address}, not only this machine: anyone who can reach this port can "
                  "classify images and read the folders under the data roots. Use --address 127.0.0.1 to serve "
                  "this machine only.", file=sys.stderr)
        try:
            model = args.model or default_model()
        except ArtifactError:
            model = None  # the page says what to run
        if model is not None:
            _logger.info("loading %s before serving", model)
            warm_start(model)
        for name in PAGE_IMPORTS:  # paid here rather than by the first visitor
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        return serve(command)

    return run_cli(body, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    # Through the package module: one tl_deploy.app, whichever way it was started.
    from tl_deploy.app import main as package_main

    sys.exit(package_main())
