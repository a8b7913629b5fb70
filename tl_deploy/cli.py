"""Shared CLI plumbing: one clear error line, non-zero exit, a traceback only with --verbose."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import TextIO

from tl_deploy.errors import TlDeployError
from tl_deploy.fileio import WRITE_ERRNOS, describe_write_error

_logger = logging.getLogger("tl_deploy")


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging and full tracebacks")


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at each record (as ``logging.lastResort`` does), not to the
    stream that was current when logging was set up: a caller that swaps and closes sys.stderr (pytest's
    capture, a notebook, a redirect) never leaves a handler writing to a closed file."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass  # StreamHandler.__init__ assigns one; the property always answers sys.stderr


def setup_logging(verbose: bool) -> None:
    """Library logs go to stderr as plain lines; results are printed by the CLI itself."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[StderrHandler()], force=True)
    for noisy in ("PIL", "matplotlib", "urllib3", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_cli(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``body(args)``; map expected failures to one ``error:`` line and an exit code."""
    verbose = bool(getattr(args, "verbose", False))
    setup_logging(verbose)
    try:
        return body(args)
    except TlDeployError as exc:
        if verbose:
            _logger.exception("failed")
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        if verbose:
            _logger.exception("failed")
        print(f"error: {describe_write_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was kept (use --resume to continue training).",
              file=sys.stderr)
        return 130
