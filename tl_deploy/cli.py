"""Shared CLI plumbing for every ``tl-deploy`` verb.

One clear error line, a traceback only with ``--verbose``, and one exit-code convention:

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     done (and, for parity and bench checks, every check passed)
1     the run failed: bad data, a broken artifact, a failed conversion, or a check that FAILED
2     it cannot run as asked: a usage error (unknown flag, a value out of range, a combination of
      options that does nothing) or a runtime/device that is not here (TensorRT, CUDA, an extra)
130   interrupted (Ctrl-C); nothing half-written is kept
====  ==========================================================================================

One flag name per idea: ``--device`` (auto, cpu, cuda, cuda:N), ``--threads`` (CPU intra-op threads),
``--report`` (where a report file goes), ``--out`` (an output folder), ``--limit`` (at most N images
of a split), ``--seed``, ``--verbose``/``-v``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from tl_deploy.errors import TlDeployError, UsageError
from tl_deploy.fileio import WRITE_ERRNOS, describe_write_error

_logger = logging.getLogger("tl_deploy")


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CANNOT_RUN = 2
EXIT_INTERRUPTED = 130


def old_names(action: argparse.Action, *flags: str) -> argparse.Action:
    """Mark some of ``action``'s option strings as earlier names of the option: they keep working,
    are left out of ``--help``, and using one logs the current name."""
    unknown = [f for f in flags if f not in action.option_strings]
    if unknown:
        raise ValueError(f"{unknown} are not option strings of {action.option_strings}")
    action.old_names = tuple(flags)  # type: ignore[attr-defined]
    return action


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """States each default once: appends ``(default: X)`` only where the help text does not already
    say it, and never for a switch that is off by default or a ``--no-...`` flag. Earlier names of an
    option (``old_names``) are not shown."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, "old_names", ())
        if not hidden:
            return super()._format_action_invocation(action)
        shown = copy.copy(action)
        shown.option_strings = [f for f in action.option_strings if f not in hidden]
        return super()._format_action_invocation(shown)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in (argparse.SUPPRESS, [], ())
        if "default" in text.lower() or unset:  # (not `in (None, False)`: 0 == False, and a 0 default is shown)
            return text
        if isinstance(action, (argparse._StoreFalseAction, argparse._StoreTrueAction)):
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{text} (default: {'on' if action.default else 'off'})".strip()
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        return f"{text} (default: %(default)s)".strip()


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line (exit code 2), like every other CLI error.

    ``parse_args`` also records which options the command line named (``given(args)``), so a verb
    can refuse an option that does nothing in the combination asked for. Abbreviated long options
    are not accepted: ``--epoch`` for ``--epochs`` would make that record unreliable.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    _tokens: Sequence[str] = ()

    def error(self, message: str) -> NoReturn:
        # argparse names an option by all its strings: name it as the user typed it, else by its
        # current names only (the earlier ones are left out of the help too)
        for action in self._actions:
            hidden = getattr(action, "old_names", ())
            if hidden:
                typed = [f for f in hidden if any(t == f or t.startswith(f + "=") for t in self._tokens)]
                shown = typed[0] if typed else "/".join(f for f in action.option_strings if f not in hidden)
                message = message.replace("/".join(action.option_strings), shown)
        self.exit(EXIT_CANNOT_RUN, f"error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        tokens = list(sys.argv[1:] if args is None else args)
        self._tokens = tokens
        parsed = super().parse_args(tokens, namespace)
        named = self._named_flags(tokens)
        parsed._given = frozenset(named)
        parsed._given_flags = named
        self._note_old_names(tokens)
        return parsed

    def _note_old_names(self, tokens: Sequence[str]) -> None:
        for action in self._actions:
            for old in getattr(action, "old_names", ()):
                if any(t == old or t.startswith(old + "=") for t in tokens):
                    current = next(f for f in action.option_strings if f not in action.old_names)  # type: ignore[attr-defined]
                    _logger.warning("%s is now called %s (the old name still works)", old, current)

    def _named_flags(self, tokens: Sequence[str]) -> dict[str, str]:
        """``dest`` -> the option string the command line used for it (the last one, if several)."""
        by_flag = {flag: action.dest for action in self._actions for flag in action.option_strings}
        named: dict[str, str] = {}
        for token in tokens:
            if token == "--":
                break
            if not token.startswith("-") or token == "-":
                continue
            flag = token.split("=", 1)[0] if token.startswith("--") else token[:2]
            if flag in by_flag:
                named[by_flag[flag]] = flag
        return named


def given(args: argparse.Namespace) -> frozenset[str]:
    """The ``dest`` of every option the command line named (empty for a namespace built by hand)."""
    return frozenset(getattr(args, "_given", frozenset()))


def refuse_unused(args: argparse.Namespace, dests: Sequence[str], why: str, *,
                  flag_of: Callable[[str], str] | None = None) -> None:
    """Refuse options that the chosen combination ignores: a user's option never silently does nothing.

    ``why`` finishes the sentence "... does nothing ...", e.g. "with --strategy linear (the backbone
    stays frozen): drop it or choose --strategy finetune, lp-ft or partial". Each option is named as
    the user typed it, or by ``flag_of(dest)`` when given (a verb whose help names it otherwise).
    """
    named = [d for d in dests if d in given(args)]
    if named:
        spelled = getattr(args, "_given_flags", {})
        name = flag_of or (lambda d: spelled.get(d, "--" + d.replace("_", "-")))
        flags = ", ".join(name(d) for d in named)
        raise UsageError(f"{flags} {'does' if len(named) == 1 else 'do'} nothing {why}.")


@contextmanager
def usage_errors() -> Iterator[None]:
    """Inside: a ``TlDeployError`` raised while reading the command line's values (a backend name, a
    tolerance, a batch list) is a usage error, exit code 2, with the same message."""
    try:
        yield
    except UsageError:
        raise
    except TlDeployError as exc:
        raise UsageError(str(exc)) from exc


def new_parser(verb: str, description: str) -> OneLineParser:
    """The parser of one verb: ``tl-deploy VERB`` (also ``python -m tl_deploy.VERB``)."""
    return OneLineParser(prog=f"tl-deploy {verb}", description=description)


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


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA GPU, else ``cpu``; any other value unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


def add_device(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, default: str = "auto",
               help: str = "auto (CUDA when present), cpu, cuda or cuda:N") -> None:
    parser.add_argument("--device", type=device_arg, default=default, help=help)


def add_threads(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                help: str = "CPU intra-op threads of torch and onnxruntime (default: their own choice)") -> None:
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, metavar="N", help=help)


def add_report(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str) -> None:
    """``--report PATH``: where the verb's report goes (``help`` says the default and the files)."""
    parser.add_argument("--report", type=Path, default=None, metavar="PATH", help=help)


def add_limit(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
              help: str = "use at most N images of the split, evenly spaced (default: all)") -> None:
    parser.add_argument("--limit", type=POSITIVE_INT, default=None, metavar="N", help=help)


def add_val_fraction(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                     help: str = "with no val/ folder: the share of train/ held out for validation "
                                 "(default: the model's own, from its config)") -> argparse.Action:
    """``--val-fraction F`` (earlier name ``--val-split``), a share strictly between 0 and 1; dest ``val_fraction``."""
    action = parser.add_argument("--val-fraction", "--val-split", dest="val_fraction", type=FRACTION, default=None,
                                 metavar="F", help=help)
    return old_names(action, "--val-split")


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


INTERRUPTED = "interrupted; nothing half-written was kept (use --resume to continue training)."
INTERRUPTED_NOTHING_KEPT = "interrupted; nothing half-written was kept."  # verbs that do not train


def run_cli(body: Callable[[argparse.Namespace], int], args: argparse.Namespace, *,
            interrupted: str = INTERRUPTED) -> int:
    """Run ``body(args)``; map expected failures to one ``error:`` line and an exit code.

    ``interrupted``: the line printed after ``error: `` on Ctrl-C (exit code 130)."""
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
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
