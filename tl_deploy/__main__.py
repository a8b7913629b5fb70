"""``tl-deploy VERB [OPTIONS]`` (also ``python -m tl_deploy VERB``): one command, the verbs as subcommands.

Each verb is its own module with ``get_args_parser()`` and ``main(argv)``, and keeps working as
``python -m tl_deploy.<module>``. A verb's module (and its heavy imports: torch, onnx, streamlit) is
imported only when that verb runs, so ``tl-deploy --help`` answers at once. Adding a verb is one row of
``VERBS``. Exit codes are those of ``tl_deploy.cli``: 0 done, 1 failed, 2 cannot run as asked, 130
interrupted.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tl_deploy import __version__
from tl_deploy.cli import EXIT_CANNOT_RUN, EXIT_OK


@dataclass(frozen=True)
class Verb:
    """One subcommand: the module whose ``main(argv)`` runs it, and argv words put before the user's."""

    module: str
    summary: str  # one line for ``tl-deploy --help``
    prefix: tuple[str, ...] = ()  # e.g. the experiment name of a module with several


VERBS: dict[str, Verb] = {
    "datasets": Verb("tl_deploy.datasets", "write a data set (Animal-Shape, Animal-Shape-M) as an ImageFolder tree"),
    "finetune": Verb("tl_deploy.finetune", "fine-tune a pretrained backbone on an ImageFolder -> models/<run>/"),
    "evaluate": Verb("tl_deploy.evaluate", "accuracy, per-class accuracy and confusion matrix of a model artifact"),
    "adapt": Verb("tl_deploy.adapt", "adapt a model artifact to a new site's unlabelled images (source-free)"),
    "export": Verb("tl_deploy.export", "export a model artifact to ONNX FP32/FP16/INT8 and TensorRT -> export/<run>/"),
    "parity": Verb("tl_deploy.parity", "prove every exported backend classifies like the PyTorch model"),
    "bench": Verb("tl_deploy.bench", "latency and throughput of every backend, and image file -> label"),
    "predict": Verb("tl_deploy.predict", "classify many image files with an exported model -> .csv/.jsonl/.parquet"),
    "app": Verb("tl_deploy.app", "start the Streamlit app that classifies images with an exported model"),
    "transfer-curve": Verb("tl_deploy.experiments", "accuracy vs labelled images per class, per transfer method",
                           prefix=("transfer-curve",)),
}


def verb_main(verb: Verb) -> Callable[[Sequence[str]], int]:
    """The verb's ``main``: from its module, or from the module's ``__main__`` (a package such as export)."""
    module = importlib.import_module(verb.module)
    if not hasattr(module, "main"):
        module = importlib.import_module(f"{verb.module}.__main__")
    main: Callable[[Sequence[str]], int] = module.main
    return main


def usage() -> str:
    width = max(len(name) for name in VERBS)
    lines = ["usage: tl-deploy VERB [OPTIONS]   (tl-deploy VERB --help for a verb's options)", "",
             "Fine-tune a pretrained image classifier, export it, prove parity, measure it and serve it.", "",
             "verbs:"]
    lines += [f"  {name:<{width}}  {verb.summary}" for name, verb in VERBS.items()]
    lines += ["", "options:", f"  {'--help, -h':<{width}}  show this message and exit",
              f"  {'--version':<{width}}  show the version and exit", "",
              "exit codes: 0 done; 1 failed (bad data, a broken artifact, a check that FAILED);",
              "            2 cannot run as asked (usage, missing runtime or device); 130 interrupted.",
              "Shared flags, exit codes and earlier flag names: docs/cli.md."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tl-deploy``: dispatch ``argv[0]`` to its verb with the remaining arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        return EXIT_CANNOT_RUN
    if args[0] in ("-h", "--help"):
        print(usage())
        return EXIT_OK
    if args[0] == "--version":
        print(f"tl-deploy {__version__}")
        return EXIT_OK
    name, rest = args[0], args[1:]
    verb = VERBS.get(name)
    if verb is None:
        print(f"error: unknown verb {name!r}: choose one of {', '.join(VERBS)} (see tl-deploy --help)",
              file=sys.stderr)
        return EXIT_CANNOT_RUN
    try:
        return verb_main(verb)([*verb.prefix, *rest])
    except SystemExit as exc:  # argparse's --help (0) and usage errors (2), as a return value
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or EXIT_OK
        raise


if __name__ == "__main__":
    sys.exit(main())
