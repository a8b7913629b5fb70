"""python -m tl_deploy.export MODEL_DIR [--onnx] [--fp16] [--int8] [--trt] ... -> export/<run-name>/"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from tl_deploy.cli import COUNT, POSITIVE, POSITIVE_INT, SEED, OneLineParser, Range, StderrHandler
from tl_deploy.formats.names import EXPORT_MANIFEST
from tl_deploy.errors import TlDeployError


def _quiet_onnxruntime_quantizer(record: logging.LogRecord) -> bool:
    """onnxruntime's quantizer logs through the root logger: per-tensor notes and a generic
    "consider pre-processing" hint (measured: pre-processing changes nothing for these graphs).
    Its real failures raise, so only its root-logger chatter is dropped."""
    return not (record.name == "root" and "onnxruntime" in record.pathname)


def get_args_parser() -> argparse.ArgumentParser:
    from tl_deploy.export.onnx import DEFAULT_OPSET, EXPORTERS
    from tl_deploy.export.quantize import DEFAULT_CALIB_SAMPLES, METHODS
    from tl_deploy.export.tensorrt import DEFAULT_PROFILE, DEFAULT_WORKSPACE_GB

    p = OneLineParser(
        prog="python -m tl_deploy.export",
        description="Export a fine-tuned model artifact to ONNX FP32 (always), FP16 and INT8 ONNX, and TensorRT.",
    )
    p.add_argument("model_dir", type=Path, help="model artifact folder (models/<run-name>)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: export/<run-name>)")
    p.add_argument("--onnx", action="store_true", help="ONNX FP32 (always written; the flag is for clarity)")
    p.add_argument("--int8", action="store_true",
                   help="INT8 ONNX (QDQ, plus a CPU-tuned file); with --trt an INT8 engine")
    p.add_argument("--trt", action="store_true",
                   help="TensorRT engine of each precision asked for (FP32 unless --int8/--fp16)")
    p.add_argument("--fp16", action="store_true",
                   help="model.fp16.onnx (float16 compute, float32 I/O); with --trt an FP16 engine from it")
    g = p.add_argument_group("ONNX")
    g.add_argument("--opset", type=Range(int, 13, 23), default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    g.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                   help="torch.onnx exporter (default torchscript: faster here, honours opset 17)")
    g.add_argument("--bake-preprocess", action="store_true",
                   help="also write model.preprocess.onnx taking uint8 NHWC images, normalising inside")
    g.add_argument("--simplify", dest="simplify", action="store_true", default=None,
                   help="simplify with onnxslim (default: when installed)")
    g.add_argument("--no-simplify", dest="simplify", action="store_false")
    g = p.add_argument_group("INT8")
    g.add_argument("--calib-data", type=Path, default=None,
                   help="calibration images: ImageFolder root or image folder (default: the training data)")
    g.add_argument("--calib-samples", type=POSITIVE_INT, default=DEFAULT_CALIB_SAMPLES,
                   help=f"at most this many calibration images (default {DEFAULT_CALIB_SAMPLES})")
    g.add_argument("--calib-method", choices=METHODS, default="minmax",
                   help="calibration method (default minmax: measured as accurate as the others, faster)")
    g.add_argument("--no-int8-cpu", dest="int8_cpu", action="store_false",
                   help="skip model.int8.cpu.onnx (the onnxruntime-CPU-tuned INT8 file)")
    g = p.add_argument_group("TensorRT")
    g.add_argument("--batch", default=DEFAULT_PROFILE, help=f"batch profile MIN:OPT:MAX (default {DEFAULT_PROFILE})")
    g.add_argument("--workspace-gb", type=POSITIVE, default=DEFAULT_WORKSPACE_GB,
                   help=f"builder workspace limit in GiB (default {DEFAULT_WORKSPACE_GB:g})")
    g.add_argument("--timing-cache", type=Path, default=None,
                   help="timing cache file reused across builds (default: <out>/../trt_timing.cache)")
    g.add_argument("--device", type=COUNT, default=0, help="CUDA device index to build and check on (default 0)")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the artifact checksum check")
    p.add_argument("--seed", type=SEED, default=0, help="calibration image pick")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging; show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", handlers=[StderrHandler()])
    if not args.verbose:
        logging.getLogger("onnxslim").setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_onnxruntime_quantizer)
    try:
        from tl_deploy.export import ExportOptions, export_artifact, format_table
        from tl_deploy.export.tensorrt import parse_batch_profile

        if args.workspace_gb <= 0:
            raise TlDeployError(f"Invalid --workspace-gb {args.workspace_gb}: choose a positive size.")
        options = ExportOptions(
            int8=args.int8, trt=args.trt, fp16=args.fp16, opset=args.opset, exporter=args.exporter,
            bake_preprocess=args.bake_preprocess, simplify=args.simplify, calib_data=args.calib_data,
            calib_samples=args.calib_samples, calib_method=args.calib_method, int8_cpu=args.int8_cpu,
            batch=parse_batch_profile(args.batch), workspace_gb=args.workspace_gb,
            timing_cache=args.timing_cache, device=args.device, verify=args.verify, seed=args.seed,
        )
        if not args.model_dir.is_dir():
            raise TlDeployError(
                f"Model artifact folder not found: {args.model_dir}. Run python -m tl_deploy.finetune first."
            )
        out = args.out or Path("export") / args.model_dir.resolve().name
        rows = export_artifact(args.model_dir, out, options)
    except TlDeployError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(format_table(rows))
    print(f"wrote {out}/ ({EXPORT_MANIFEST} lists the files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
