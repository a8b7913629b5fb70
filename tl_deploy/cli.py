"""Shared CLI plumbing: one clear error line, non-zero exit, a traceback only with --verbose."""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TextIO

from tl_deploy.errors import TlDeployError
from tl_deploy.fileio import WRITE_ERRNOS, describe_write_error

_logger = logging.getLogger("tl_deploy")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line (exit code 2), like every other CLI error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric option: an argparse ``type`` and a check for library callers.

    Floats must be finite (NaN and infinity are never a meaningful setting here).
    """

    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{noun} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {self.high:g}"
        return noun

    def problem(self, value: object) -> bool:
        """True when ``value`` is outside this range (or not a number of the right kind)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True
        if self.kind is int and not isinstance(value, int):
            return True
        if not math.isfinite(value):
            return True
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return True
        return self.high is not None and (value > self.high or (self.high_open and value == self.high))

    def check(self, flag: str, value: object) -> None:
        """Raise a ``TlDeployError`` naming ``flag``, ``value`` and the allowed range."""
        if self.problem(value):
            raise TlDeployError(f"Invalid {flag} {value!r}: choose {self.describe()}.")

    def __call__(self, text: str) -> int | float:
        try:
            value: int | float = int(text) if self.kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.describe()}") from None
        if self.problem(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: choose {self.describe()}")
        return value


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def device_arg(text: str) -> str:
    """``--device``: cpu, cuda or cuda:N (``auto`` where the verb offers it is added by the caller)."""
    if text == "auto" or _DEVICE.fullmatch(text):
        return text
    raise argparse.ArgumentTypeError(f"invalid device {text!r}: choose cpu, cuda or cuda:N")


def torch_device_arg(text: str) -> str:
    """``--device`` without ``auto``: cpu, cuda or cuda:N."""
    if text == "auto":
        raise argparse.ArgumentTypeError("invalid device 'auto': choose cpu, cuda or cuda:N")
    return device_arg(text)


def apply_ranges(parser: argparse.ArgumentParser, ranges: dict[str, Range]) -> None:
    """Make every option whose ``dest`` is in ``ranges`` parse with its allowed range."""
    for action in parser._actions:
        if action.dest in ranges:
            action.type = ranges[action.dest]


# The ranges most verbs share.
POSITIVE_INT = Range(int, 1)
COUNT = Range(int, 0)  # zero allowed
SEED = Range(int, 0, 2**32 - 1)  # numpy's seeds
FRACTION = Range(float, 0.0, 1.0, low_open=True, high_open=True)  # a share strictly between 0 and 1
POSITIVE = Range(float, 0.0, low_open=True)
NON_NEGATIVE = Range(float, 0.0)


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
