"""Time a training step of the default job's trained layers in fp32 and under bf16 autocast on this CPU,
and print what ``--amp auto`` picks here.

The step is the one ``--amp auto`` measures before fine-tuning (``tl_deploy.train.amp.time_train_step``):
forward + backward of the layers after the frozen stages, on one micro-batch of their cached inputs.
Rounds alternate fp32 and bf16, so machine load hits both alike.

    python bench/bench_amp.py [--model efficientnet_lite0] [--img-size 112] [--unfreeze 4] [--batch-size 32]
                              [--rounds 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from tl_deploy.backbones import backbone_stages, create_model, cut_after_stages, set_trainable
from tl_deploy.train.amp import BF16_MIN_SPEEDUP, cpu_has_native_bf16, measure_amp, resolve_amp, time_train_step

CPU = torch.device("cpu")
NUM_CLASSES = 10  # Animal-Shape


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--unfreeze", type=int, default=4, help="stages that train; the others form the frozen prefix")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="alternating fp32/bf16 rounds of 3 timed steps each")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=NUM_CLASSES, weights="embedded", drop_rate=0.2)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    set_trainable(model, args.unfreeze)
    split = cut_after_stages(model, len(backbone_stages(model)) - args.unfreeze)
    if split is None:
        raise SystemExit(f"error: {args.model} cannot be cut after its frozen stages; use another --unfreeze.")
    prefix, suffix = split
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size).contiguous(
        memory_format=torch.channels_last)  # (B, 3, H, W)
    with torch.no_grad():
        x = prefix.eval()(images)  # (B, C, h, w): what the trained layers receive
    y = torch.arange(args.batch_size) % NUM_CLASSES  # (B,)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        times["fp32"].append(time_train_step(suffix, x, y, CPU, None, bn_eval=True))
        times["bf16"].append(time_train_step(suffix, x, y, CPU, torch.bfloat16, bn_eval=True))
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print(f"{args.model} {args.img_size} px, last {args.unfreeze} stages train, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, native bf16: {cpu_has_native_bf16()}")
    print(f"fp32 {fp32:8.1f} ms/step   (rounds: {', '.join(f'{t:.1f}' for t in times['fp32'])})")
    print(f"bf16 {bf16:8.1f} ms/step   (rounds: {', '.join(f'{t:.1f}' for t in times['bf16'])})")
    print(f"bf16 speed-up {fp32 / bf16:.2f}x (auto needs {BF16_MIN_SPEEDUP}x)")
    choice = measure_amp(resolve_amp("auto", CPU), lambda dtype: bf16 if dtype == torch.bfloat16 else fp32)
    print(f"--amp auto here: {choice.name} ({choice.reason})")


if __name__ == "__main__":
    main()
