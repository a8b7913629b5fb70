"""``tl-deploy finetune`` / ``python -m tl_deploy.finetune``: fine-tune a pretrained backbone and write a
model artifact.

    python -m tl_deploy.finetune                      # the embedded default: Animal-Shape, lp-ft
    python -m tl_deploy.finetune --data DIR --strategy finetune --epochs 5

The options are ``tl_deploy.train.config.TrainConfig``'s fields; the recipe is ``tl_deploy.train.recipe``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tl_deploy.cli import run_cli
from tl_deploy.train.cli import config_from_args, get_args_parser
from tl_deploy.train.recipe import fit

__all__ = ["get_args_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def body(a: argparse.Namespace) -> int:
        fit(config_from_args(a))
        return 0

    return run_cli(body, args)


if __name__ == "__main__":
    sys.exit(main())
