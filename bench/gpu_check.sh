#!/usr/bin/env bash
# The GPU story in one command: on a machine with an NVIDIA GPU, a short fine-tune on CUDA, export
# (ONNX FP32, INT8 ONNX, and TensorRT FP32/FP16/INT8 engines when TensorRT is installed), parity of
# every backend against PyTorch, and the speed benchmark. Every figure is printed.
#
#   bash bench/gpu_check.sh [WORKDIR]     # WORKDIR default: a new folder under /tmp
#
# Environment: PYTHON (default .venv/bin/python, else python3), DATA (an ImageFolder with
# train/val/test; default data/animal-shape, prepared if missing), LIMIT (training images per class,
# default 200), PROBE_EPOCHS (default 3), EPOCHS (default 1).
# Needs torch with CUDA and this package's dependencies (pip install -e '.[dev]'). TensorRT is
# optional (pip install 'tl_deploy[trt]' --extra-index-url https://pypi.nvidia.com): without it the
# script says so, skips the engines and runs the rest. Designed to finish in under 8 minutes on one
# datacenter GPU. Exit code: 0 when every parity check passed, 1 when one failed, 2 when the machine
# cannot run the check at all.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WORK=${1:-$(mktemp -d /tmp/tl_deploy_gpu_check.XXXXXX)}
mkdir -p "$WORK"
LIMIT=${LIMIT:-200}
PROBE_EPOCHS=${PROBE_EPOCHS:-3}
EPOCHS=${EPOCHS:-1}
START=$SECONDS
step() { printf '\n=== [%4d s] %s\n' $((SECONDS - START)) "$*"; }

step "GPU"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "error: nvidia-smi not found: run this on a machine with an NVIDIA GPU and its driver." >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" - <<'EOF'
import sys

try:
    import torch
except ImportError:
    sys.exit("error: torch is not installed: pip install -e '.[dev]' with a CUDA build of torch")
if not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: install a CUDA build of torch")
import onnxruntime as ort

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
EOF

step "TensorRT"
TRT_OK=0
if "$PYTHON" - <<'EOF'
import sys

from tl_deploy.runtime.catalog import tensorrt_problem

problem = tensorrt_problem()
if problem:
    print(f"TensorRT absent: {problem}")
    print("Engines are skipped (parity and bench list them as SKIPPED); everything else runs.")
    sys.exit(1)
import tensorrt

print(f"TensorRT {tensorrt.__version__}")
EOF
then
  TRT_OK=1
fi

step "data"
DATA=${DATA:-data/animal-shape}
if [[ ! -d "$DATA/test" ]]; then
  echo "$DATA has no test/: preparing Animal-Shape in $WORK/data"
  DATA=$WORK/data/animal-shape
  "$PYTHON" -m tl_deploy.datasets animal-shape --out "$DATA"
fi
echo "data: $DATA"

step "fine-tune on CUDA (lp-ft, $LIMIT images per class, $PROBE_EPOCHS probe + $EPOCHS fine-tuning epochs)"
MODEL=$WORK/models/gpu-check
"$PYTHON" -m tl_deploy.finetune --data "$DATA" --device cuda --limit-per-class "$LIMIT" \
  --probe-epochs "$PROBE_EPOCHS" --epochs "$EPOCHS" --cache-dir "$WORK/cache" --out "$MODEL"

step "export"
EXPORT=$WORK/export/gpu-check
if [[ $TRT_OK == 1 ]]; then
  # One folder holds one engine per precision asked for: INT8 and FP16 here, FP32 in a second folder.
  "$PYTHON" -m tl_deploy.export "$MODEL" --int8 --trt --fp16 --out "$EXPORT"
  "$PYTHON" -m tl_deploy.export "$MODEL" --trt --out "$EXPORT-fp32"
else
  "$PYTHON" -m tl_deploy.export "$MODEL" --int8 --out "$EXPORT"
fi

FAILED=0
step "parity (PyTorch FP32 on the CPU is the reference)"
"$PYTHON" -m tl_deploy.parity "$MODEL" --export "$EXPORT" --data "$DATA" || FAILED=1
if [[ $TRT_OK == 1 ]]; then
  "$PYTHON" -m tl_deploy.parity "$MODEL" --export "$EXPORT-fp32" --data "$DATA" --backends trt-fp32 || FAILED=1
fi

step "bench (PyTorch on CUDA is the baseline)"
"$PYTHON" -m tl_deploy.bench "$MODEL" --export "$EXPORT" --data "$DATA" --batch 1,8,32 --rounds 5 --seconds 0.1
if [[ $TRT_OK == 1 ]]; then
  "$PYTHON" -m tl_deploy.bench "$MODEL" --export "$EXPORT-fp32" --data "$DATA" --backends torch,trt-fp32 \
    --batch 1,8,32 --rounds 5 --seconds 0.1 --out "$EXPORT-fp32.bench"
fi

step "done in $((SECONDS - START)) s; reports in $WORK/export/"
ls -1 "$WORK/export/"
if [[ $FAILED == 1 ]]; then
  echo "FAILED | a parity check failed (see the FAILED lines above)"
  exit 1
fi
echo "PASSED | every backend that ran matched PyTorch within its tolerance"
