"""The ``finetune`` verb's parser, generated from ``TrainConfig``'s fields, and the options it refuses.

Every option's default, help, choices and range live once, on its config field
(``tl_deploy.train.config.option``); ``get_args_parser`` only turns them into argparse calls.
"""

from __future__ import annotations

import argparse
import dataclasses

from tl_deploy import cli
from tl_deploy.errors import TlDeployError
from tl_deploy.train.adaptation import DA_METHODS
from tl_deploy.train.config import GROUPS, TrainConfig, img_size_arg

DESCRIPTION = ("Fine-tune a pretrained classifier on an ImageFolder dataset and write a model artifact. "
               "With no --data, runs the embedded default (Animal-Shape).")


def bn_mode(text: str) -> str:
    """``--bn``: ``frozen`` is the earlier name of ``eval``."""
    return "eval" if text == "frozen" else text


def _add_field(group: argparse._ArgumentGroup, f: dataclasses.Field) -> None:  # type: ignore[type-arg]
    meta = f.metadata
    flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
    flags = (*flags, *meta["old"])
    kwargs: dict[str, object] = {"dest": f.name, "default": f.default, "help": meta["help"]}
    switch = meta["switch"]
    if switch == "both":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif switch == "on":
        kwargs["action"] = "store_true"
    elif switch == "off":
        kwargs["action"] = "store_false"
    else:
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        if meta["allowed"] is not None:
            kwargs["type"] = meta["allowed"]
        if meta["metavar"] is not None:
            kwargs["metavar"] = meta["metavar"]
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
    if f.name == "device":
        kwargs["type"] = cli.device_arg
    if f.name == "bn":
        kwargs["type"] = bn_mode
    if f.name == "img_size":
        kwargs["type"] = img_size_arg
    action = group.add_argument(*flags, **kwargs)  # type: ignore[arg-type]
    if meta["old"]:
        cli.old_names(action, *meta["old"])


def get_args_parser() -> argparse.ArgumentParser:
    """``tl-deploy finetune``'s parser: one option per ``TrainConfig`` field, plus ``--pretrained``."""
    parser = cli.new_parser("finetune", DESCRIPTION)
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for f in dataclasses.fields(TrainConfig):
        _add_field(groups[f.metadata["group"]], f)
    groups["model"].add_argument("--pretrained", action="store_true", help="same as --weights hub")
    cli.add_verbose(parser)
    return parser


# (options, the strategies or settings in which they do nothing, the rest of the sentence)
FINETUNING_ONLY = ("epochs", "lr", "backbone_lr_mult", "layer_decay", "warmup_epochs", "bn", "augment",
                   "grad_accum_steps", "sync_bn", "patience", "amp", "unfreeze")
PROBE_ONLY = ("probe_epochs", "probe_lr")
FUSION_ONLY = ("fusion_levels", "fusion_dim", "channel_attention")


def flag_of(dest: str) -> str:
    """The option string ``--help`` shows for a config field (``--no-channel-attention``, ``--opt``...)."""
    flags = TrainConfig.__dataclass_fields__[dest].metadata["flags"]
    return flags[0] if flags else "--" + dest.replace("_", "-")


def refuse(args: argparse.Namespace, dests: tuple[str, ...], why: str) -> None:
    """``cli.refuse_unused``, naming each option by the flag ``--help`` shows for it."""
    cli.refuse_unused(args, dests, why, flag_of=flag_of)


def refuse_unused_options(args: argparse.Namespace) -> None:
    """Refuse (exit 2) an option the user named that the chosen combination ignores."""
    if args.strategy == "linear":
        refuse(args, FINETUNING_ONLY, "with --strategy linear (only the head trains, on cached "
                                                 "features): drop it or choose --strategy finetune, lp-ft or "
                                                 "partial")
    if args.strategy == "linear" and args.head == "linear":
        refuse(args, ("drop_rate",), "with --strategy linear and --head linear (the probe trains the bare linear "
                                     "head): drop it, or add --head attention-fusion or another --strategy")
    if args.strategy in ("finetune", "partial"):
        refuse(args, PROBE_ONLY, f"with --strategy {args.strategy} (it has no linear probe): drop it "
                                            "or choose --strategy linear or lp-ft")
    if args.head == "linear":
        refuse(args, FUSION_ONLY, "with --head linear: drop it or add --head attention-fusion")
    if args.da is None:
        refuse(args, ("da_weight", "da_batch_size", "da_threshold"),
               f"without --da: drop it or add --da {', '.join(DA_METHODS)}")
    elif args.da != "self-train":
        refuse(args, ("da_threshold",), f"with --da {args.da} (only self-train uses pseudo-labels): drop it or "
                                        "choose --da self-train")
    if args.layer_decay is not None:
        refuse(args, ("backbone_lr_mult",), "with --layer-decay (layer-wise decay sets the backbone's "
                                                       "rates): pass only one of them")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run ``args`` asks for; refuses options that would do nothing."""
    refuse_unused_options(args)
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if args.pretrained:
        if args.weights not in ("embedded", "hub"):
            raise TlDeployError("--pretrained and --weights PATH/none contradict each other: pass only one.")
        values["weights"] = "hub"
    return TrainConfig(**values)
