"""tl-deploy export MODEL_DIR [--fp16] [--int8] [--trt] ... -> export/<run-name>/ (also python -m tl_deploy.export)"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tl_deploy.cli import (
    COUNT,
    EXIT_OK,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    Range,
    add_verbose,
    new_parser,
    old_names,
    refuse_unused,
    run_cli,
)
from tl_deploy.errors import ArtifactError, DataError, UsageError
from tl_deploy.formats.export_manifest import is_export_folder
from tl_deploy.formats.names import EXPORT_MANIFEST

if TYPE_CHECKING:
    from tl_deploy.export import ExportOptions
    from tl_deploy.export.tensorrt import BatchProfile

INT8_ONLY = ("calib_samples", "calib_method", "int8_cpu")  # used only with --int8
TRT_ONLY = ("trt_profile", "workspace_gb", "timing_cache", "device")  # used only with --trt
# --calib-data also feeds the FP16 and engine checks, --seed picks those images too
CHECK_IMAGES = ("calib_data", "seed")
REPOSITORY_ONLY = ("model_dir", "triton", "force", "verify", "verbose")  # all an export folder's --triton uses


def _quiet_onnxruntime_quantizer(record: logging.LogRecord) -> bool:
    """onnxruntime's quantizer logs through the root logger: per-tensor notes and a generic
    "consider pre-processing" hint (measured: pre-processing changes nothing for these graphs).
    Its real failures raise, so only its root-logger chatter is dropped."""
    return not (record.name == "root" and "onnxruntime" in record.pathname)


def get_args_parser() -> argparse.ArgumentParser:
    from tl_deploy.export.onnx import DEFAULT_OPSETS, EXPORTERS, MAX_OPSET, MIN_OPSET
    from tl_deploy.export.quantize import DEFAULT_CALIB_SAMPLES, METHODS
    from tl_deploy.export.tensorrt import DEFAULT_PROFILE, DEFAULT_WORKSPACE_GB

    p = new_parser("export", "Export a fine-tuned model artifact to ONNX FP32 (always), FP16 and INT8 ONNX, "
                             "and TensorRT.")
    p.add_argument("model_dir", type=Path, help="model artifact folder (models/<run-name>)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder (default: export/<run-name>)")
    p.add_argument("--onnx", action="store_true", help="ONNX FP32 (always written; the flag is for clarity)")
    p.add_argument("--int8", action="store_true",
                   help="INT8 ONNX (QDQ, plus a CPU-tuned file); with --trt an INT8 engine")
    p.add_argument("--trt", action="store_true",
                   help="TensorRT engine of each precision asked for (FP32 unless --int8/--fp16)")
    p.add_argument("--fp16", action="store_true",
                   help="model.fp16.onnx (float16 compute, float32 I/O); with --trt an FP16 engine from it")
    g = p.add_argument_group("ONNX")
    g.add_argument("--opset", type=Range(int, MIN_OPSET["torchscript"], MAX_OPSET), default=None,
                   help=f"ONNX opset (default: {DEFAULT_OPSETS['torchscript']} with the torchscript exporter, "
                        f"{DEFAULT_OPSETS['dynamo']} with dynamo, which needs {MIN_OPSET['dynamo']} or more)")
    g.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                   help="torch.onnx exporter (default torchscript: faster here, folds BatchNorm, honours opset 17)")
    g.add_argument("--bake-preprocess", action="store_true",
                   help="also write model.preprocess.onnx taking uint8 NHWC images, normalising inside")
    g.add_argument("--simplify", dest="simplify", action="store_true", default=None,
                   help="simplify with onnxslim (default: when installed)")
    g.add_argument("--no-simplify", dest="simplify", action="store_false", help="leave the graph unsimplified")
    g = p.add_argument_group("INT8 (with --int8)")
    g.add_argument("--calib-data", type=Path, default=None, metavar="DIR",
                   help="calibration images: ImageFolder root or image folder (default: the training data)")
    g.add_argument("--calib-samples", type=POSITIVE_INT, default=DEFAULT_CALIB_SAMPLES, metavar="N",
                   help="at most this many calibration images")
    g.add_argument("--calib-method", choices=METHODS, default="minmax",
                   help="calibration method (default minmax: measured as accurate as the others, faster)")
    g.add_argument("--no-int8-cpu", dest="int8_cpu", action="store_false",
                   help="skip model.int8.cpu.onnx (the onnxruntime-CPU-tuned INT8 file)")
    g = p.add_argument_group("TensorRT (with --trt)")
    old_names(g.add_argument("--trt-profile", "--batch", dest="trt_profile", default=DEFAULT_PROFILE,
                             metavar="MIN:OPT:MAX", help="batch sizes the engines accept (MIN..MAX) and are "
                                                         "tuned for (OPT); one number N means a fixed batch"),
              "--batch")
    g.add_argument("--workspace-gb", type=POSITIVE, default=DEFAULT_WORKSPACE_GB, metavar="GB",
                   help="builder workspace limit in GiB")
    g.add_argument("--timing-cache", type=Path, default=None, metavar="PATH",
                   help="timing cache file reused across builds (default: <out>/../trt_timing.cache)")
    g.add_argument("--device", type=cuda_index, default=0, metavar="N",
                   help="CUDA device index to build and check the engines on (N or cuda:N)")
    g = p.add_argument_group("Triton Inference Server")
    g.add_argument("--triton", type=Path, default=None, metavar="DIR",
                   help="also write a Triton model repository of the export at DIR (reuses a current export; "
                        "MODEL_DIR may be an export folder)")
    g.add_argument("--force", action="store_true", help="replace an earlier Triton repository at --triton DIR")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the artifact checksum check (with --triton, also the export files' check)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the calibration and check image pick")
    add_verbose(p)
    return p


def cuda_index(text: str) -> int:
    """``--device``: a CUDA device index, written N or cuda:N (TensorRT builds on a GPU, so no cpu/auto)."""
    if text.startswith("cuda:"):
        text = text[len("cuda:"):]
    return int(COUNT(text))


def refuse_no_ops(args: argparse.Namespace) -> None:
    """Options that do nothing in the combination asked for are refused, not ignored."""
    if not args.int8:
        refuse_unused(args, INT8_ONLY, "without --int8 (no INT8 file is written): add --int8 or drop it")
        if not (args.fp16 or args.trt):
            refuse_unused(args, CHECK_IMAGES, "without --int8, --fp16 or --trt (it picks calibration and check "
                                              "images, and the FP32 file needs none): add one or drop it")
    if not args.trt:
        refuse_unused(args, TRT_ONLY, "without --trt (no TensorRT engine is built): add --trt or drop it")
    if args.triton is None:
        refuse_unused(args, ("force",), "without --triton (no Triton repository is written): add --triton DIR "
                                        "or drop it")


def resolve_opset(args: argparse.Namespace) -> int:
    """The opset asked for, or the exporter's default; an opset the exporter cannot write is refused."""
    from tl_deploy.export.onnx import MIN_OPSET, default_opset

    if args.opset is None:
        return default_opset(args.exporter)
    lowest = MIN_OPSET[args.exporter]
    if args.opset < lowest:
        raise UsageError(f"--opset {args.opset} cannot be written by the {args.exporter} exporter (it needs "
                         f"{lowest} or more): pass --opset {lowest}, drop --opset, or use --exporter torchscript.")
    return int(args.opset)


def parse_trt_profile(args: argparse.Namespace) -> BatchProfile:
    """``--trt-profile`` as a ``BatchProfile``; a malformed one is a usage error (exit code 2)."""
    from tl_deploy.export.tensorrt import parse_batch_profile

    flag = getattr(args, "_given_flags", {}).get("trt_profile", "--trt-profile")
    try:
        return parse_batch_profile(args.trt_profile)
    except DataError as exc:
        raise UsageError(str(exc).replace("--batch", flag)) from exc


def quiet_libraries(verbose: bool) -> None:
    """Keep the converters' chatter out of the output unless ``--verbose``."""
    if verbose:
        return
    logging.getLogger("onnxslim").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_onnxruntime_quantizer)


def export(args: argparse.Namespace) -> int:
    """The export verb: check the options, export, print the table of files written."""
    from tl_deploy.export import ExportOptions, export_artifact, format_table

    quiet_libraries(args.verbose)
    refuse_no_ops(args)
    options = ExportOptions(
        int8=args.int8, trt=args.trt, fp16=args.fp16, opset=resolve_opset(args), exporter=args.exporter,
        bake_preprocess=args.bake_preprocess, simplify=args.simplify, calib_data=args.calib_data,
        calib_samples=args.calib_samples, calib_method=args.calib_method, int8_cpu=args.int8_cpu,
        batch=parse_trt_profile(args), workspace_gb=args.workspace_gb,
        timing_cache=args.timing_cache, device=args.device, verify=args.verify, seed=args.seed,
    )
    if args.triton is not None and is_export_folder(args.model_dir):
        refuse_unused(args, [d for d in vars(args) if d not in REPOSITORY_ONLY and not d.startswith("_")],
                      f"when MODEL_DIR is an export folder (its {EXPORT_MANIFEST}: nothing is exported, its files "
                      "go into the Triton repository): drop it, or pass the model artifact folder")
        return write_triton(args.model_dir, args)
    if not args.model_dir.is_dir():
        raise ArtifactError(f"Model artifact folder not found: {args.model_dir}. Run tl-deploy finetune first.")
    out = args.out or Path("export") / args.model_dir.resolve().name
    if args.triton is not None:
        from tl_deploy.export.triton import check_repository_dir, export_is_current

        check_repository_dir(args.triton, out, force=args.force)
        if export_is_current(args.model_dir, out, expected_files(options), expected_options(options)):
            print(f"{out}/ is current for {args.model_dir}: reused, not exported again")
            return write_triton(out, args)
    rows = export_artifact(args.model_dir, out, options)
    print(format_table(rows))
    print(f"wrote {out}/ ({EXPORT_MANIFEST} lists the files)")
    return write_triton(out, args) if args.triton is not None else EXIT_OK


def expected_files(options: ExportOptions) -> list[str]:
    """The files an export with ``options`` writes (what a reused export folder must hold)."""
    from tl_deploy.formats.names import BAKED_FILE, FP16_FILE, FP32_FILE, INT8_CPU_FILE, INT8_FILE, engine_file

    files = [FP32_FILE] + [BAKED_FILE] * options.bake_preprocess + [FP16_FILE] * options.fp16
    files += [INT8_FILE] * options.int8 + [INT8_CPU_FILE] * (options.int8 and options.int8_cpu)
    if options.trt:
        files += [engine_file(p) for p, asked in (("int8", options.int8), ("fp16", options.fp16),
                                                  ("fp32", not (options.int8 or options.fp16))) if asked]
    return files


def expected_options(options: ExportOptions) -> dict[str, object]:
    """The export.json options a reused export folder must record."""
    recorded: dict[str, object] = {"opset": options.opset, "exporter": options.exporter}
    if options.int8:
        recorded["calib_method"] = options.calib_method
    if options.trt:
        recorded["batch"] = str(options.batch)
    return recorded


def write_triton(export_dir: Path, args: argparse.Namespace) -> int:
    """Write the Triton model repository of ``export_dir`` at ``--triton DIR`` and list its models."""
    from tl_deploy.export.triton import write_triton_repository

    models = write_triton_repository(export_dir, args.triton, force=args.force, verify=args.verify)
    width = max(len(model.name) for model in models)
    for model in models:
        print(f"  {model.name:<{width}}  {model.backend:<11}  max_batch_size {model.max_batch_size:<3}  "
              f"<- {model.source}")
    print(f"wrote Triton model repository {args.triton}/ ({len(models)} models)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(export, get_args_parser().parse_args(argv), interrupted="interrupted; nothing was written.")


if __name__ == "__main__":
    sys.exit(main())
